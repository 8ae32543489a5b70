#!/bin/sh
# The emulator's test guest user space (PID 1; static busybox). Installed as /sbin/init on the
# test root file system and as /init in the test initramfs. It proves user space works:
#   - prints VDISKFS-GUEST: markers on the console;
#   - md5sums the device named by vdiskfs.md5dev= and compares it with vdiskfs.md5=;
#   - writes a file (on / when it is the disk root, or on vdiskfs.writedev= mounted at /mnt);
#   - with vdiskfs.readbench=DEV, reads DEV sequentially and reports the rate (for
#     scripts/bench/boot.py; "VDISKFS-MARK name" lines let the VMM time that phase);
#   - with vdiskfs.parallel=DEV (and vdiskfs.parallel_jobs=N, default 4), copies 2 MiB block i
#     of DEV to block N+i with N dd processes at once, O_DIRECT both ways, so that the virtio
#     queue holds many requests at once (tests/emulator/test_boot.py checks the copies);
#   - powers off.
# Parameters come from /proc/cmdline (the kernel keeps dotted ones away from init's env).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "VDISKFS-GUEST: init running as pid $$"

param() {
    for word in $(cat /proc/cmdline); do
        case "$word" in "$1="*) echo "${word#*=}"; return;; esac
    done
}

md5dev=$(param vdiskfs.md5dev)
expected=$(param vdiskfs.md5)
if [ -n "$md5dev" ]; then
    actual=$(md5sum "$md5dev" | cut -d' ' -f1)
    if [ "$actual" = "$expected" ]; then
        echo "VDISKFS-GUEST: md5 ok $md5dev $actual"
    else
        echo "VDISKFS-GUEST: md5 MISMATCH $md5dev got $actual expected $expected"
    fi
fi

readbench=$(param vdiskfs.readbench)
if [ -n "$readbench" ]; then
    # Through the page cache, then straight into dd's buffer (O_DIRECT).
    echo "VDISKFS-MARK readbench-start"
    dd if="$readbench" of=/dev/null bs=1M 2>&1 | tail -n 1 | sed 's/^/VDISKFS-GUEST: readbench /'
    echo "VDISKFS-MARK readbench-end"
    echo "VDISKFS-MARK readbench-direct-start"
    dd if="$readbench" of=/dev/null bs=1M iflag=direct 2>&1 | tail -n 1 \
        | sed 's/^/VDISKFS-GUEST: readbench direct /'
    echo "VDISKFS-MARK readbench-direct-end"
fi

parallel=$(param vdiskfs.parallel)
if [ -n "$parallel" ]; then
    jobs=$(param vdiskfs.parallel_jobs)
    jobs=${jobs:-4}
    # One 2 MiB read and one 2 MiB write per job: the block layer splits each into requests of
    # at most 1280 KiB and dispatches them together (one kick), and the jobs overlap.
    echo "VDISKFS-MARK parallel-start"
    pids=""
    i=0
    while [ "$i" -lt "$jobs" ]; do
        dd if="$parallel" of="$parallel" bs=2M count=1 skip="$i" seek=$((jobs + i)) \
            iflag=direct oflag=direct conv=notrunc 2>/dev/null &
        pids="$pids $!"
        i=$((i + 1))
    done
    failed=0
    for pid in $pids; do
        wait "$pid" || failed=$((failed + 1))
    done
    echo "VDISKFS-MARK parallel-end"
    echo "VDISKFS-GUEST: parallel copies done: $jobs jobs, $failed failed"
fi

writedev=$(param vdiskfs.writedev)
file=/vdiskfs-guest-was-here
if [ -n "$writedev" ]; then
    mkdir -p /mnt && mount "$writedev" /mnt && file=/mnt/vdiskfs-guest-was-here
fi
if echo "written by the vdiskfs test guest" > "$file" && sync; then
    echo "VDISKFS-GUEST: wrote $file"
else
    echo "VDISKFS-GUEST: write FAILED"
fi
[ -n "$writedev" ] && umount /mnt
mount -o remount,ro / 2>/dev/null
echo "VDISKFS-GUEST: powering off"
poweroff -f
