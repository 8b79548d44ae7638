# qrbd %postun ($1: 0 on erase, 1 on upgrade). /var/lib/qrbd (the data) is never deleted.
# No restart on upgrade: restart the daemon when convenient (systemctl restart qrbd).
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null 2>&1 || :
fi
exit 0
