# qrbd %post ($1: 1 on install, 2 on upgrade). The service is neither enabled nor started:
# /etc/qrbd/qrbd.toml must be edited first (the node name at least).
# The data directory is made here, not owned by the package, so that erasing the package
# never removes it (it holds backing images and metadata).
if [ ! -d /var/lib/qrbd ]; then
    install -d -m 0700 /var/lib/qrbd
fi
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
    echo "qrbd: set [node] name and the resources in /etc/qrbd/qrbd.toml, then run" \
        "'qrbd create-md <resource>' and 'systemctl enable --now qrbd'."
fi
exit 0
