# qrbd %preun ($1: 0 on erase, 1 on upgrade). On erase, stop and disable the service; on
# upgrade leave the running daemon alone (a restart pauses I/O on every image).
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now qrbd.service >/dev/null 2>&1 || :
fi
exit 0
