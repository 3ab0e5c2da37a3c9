#!/bin/sh
# PID 1 of the ringfence test guest, packed into the base initramfs by tests/e2e/guest.py.
# It loads the virtio drivers, runs /test.sh (added per boot) with its output on the serial
# console, reports the script's status to the host as "RF-EXIT <status>" and powers off.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# The numbered file names encode the dependency order: there is no depmod data for modprobe.
for module in /lib/rf-modules/*.ko; do
    [ -e "$module" ] || continue  # every driver is built in: the glob matched nothing
    insmod "$module" || echo "RF-INIT: insmod $module failed"
done

# Firmware output leaves the cursor mid-line; the script's first line must start its own.
printf '\nRF-START\n'
status=0
if [ -e /test.sh ]; then
    sh /test.sh
    status=$?
fi
sync
# Start on a fresh line in case the script's last output had no newline.
printf '\nRF-EXIT %s\n' "$status"
poweroff -f
