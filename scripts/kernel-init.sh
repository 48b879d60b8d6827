#!/bin/sh
# /init of the arm64-kernel lane's initramfs (see test-arm64-kernel.sh): mount
# what the tests need, run the kernel-marked tests against the unpacked wheel,
# print the result and the lane report on the console, and power off. The
# root has dash, mount, mkdir and Python, nothing else: shell builtins only.
set -e  # a root that cannot be set up never prints the start marker
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
echo 1 > /proc/sys/kernel/sysrq
read -r release < /proc/sys/kernel/osrelease
echo "GUESTMEM-KERNEL-LANE-START $release"
set +e

set --
while IFS= read -r arg; do set -- "$@" "$arg"; done < /pytest-args
cd /src/tests
PATH=/usr/bin HOME=/root LANG=C.UTF-8 PYTHONPATH=/opt/guestmem PYTHONDONTWRITEBYTECODE=1 \
    GUESTMEM_LANE=arm64-kernel GUESTMEM_LANE_REPORT=/tmp/lane.json \
    GUESTMEM_GUEST_KERNEL=/opt/guest/Image GUESTMEM_GUEST_INITRD=/opt/guest/initrd \
    python3 -m pytest -p no:cacheprovider -q --color=no --durations=15 -m kernel "$@"  # each console byte costs
status=$?
echo "GUESTMEM-LANE-REPORT-BEGIN"
[ -f /tmp/lane.json ] && while IFS= read -r line || [ -n "$line" ]; do echo "$line"; done < /tmp/lane.json
echo "GUESTMEM-LANE-REPORT-END"
echo "GUESTMEM-KERNEL-LANE-EXIT=$status"
echo o > /proc/sysrq-trigger
exec python3 -c "import time; time.sleep(60)"  # /init must not exit before the power-off
