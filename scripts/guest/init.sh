#!/bin/sh
# The emulator's test guest user space (PID 1; static busybox). Installed as /sbin/init on the
# test root file system and as /init in the test initramfs. It proves user space works:
#   - prints VDISKFS-GUEST: markers on the console;
#   - md5sums the device named by vdiskfs.md5dev= and compares it with vdiskfs.md5=;
#   - writes a file (on / when it is the disk root, or on vdiskfs.writedev= mounted at /mnt);
#   - with vdiskfs.readbench=DEV, reads DEV sequentially and reports the rate (for
#     scripts/bench/boot.py; "VDISKFS-MARK name" lines let the VMM time that phase);
#   - with vdiskfs.parallel=DEV, keeps DEV's virtio queue busy with many requests at once:
#     vdiskfs.parallel_jobs=N (default 2) dd processes at once copy block i (of
#     vdiskfs.parallel_kib KiB, default 1024) to block N+i with O_DIRECT; then vdiskfs.scatter=M
#     (default 16) 4 KiB blocks i go to every other 4 KiB block after those, written back by
#     one sync (tests/emulator/test_boot.py checks the copies);
#   - with vdiskfs.trim=DEV, mounts DEV's ext4 on /mnt, deletes /mnt/<vdiskfs.trim_rm>, syncs,
#     runs fstrim on it, unmounts and flushes DEV;
#   - with vdiskfs.zeroes=DEV, runs vdiskfs-zeroes (scripts/guest/zeroes.c, found on the ext4 of
#     vdiskfs.tools=DEV2, mounted read-only on /tools) on DEV with the operations of
#     vdiskfs.zeroes_ops=MODE:OFFSET:LENGTH,... (MODE punch, zero or discard), then flushes DEV;
#     both print DEV's discard and write-zeroes limits as the kernel saw them;
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
    jobs=${jobs:-2}
    kib=$(param vdiskfs.parallel_kib)
    kib=${kib:-1024}
    scatter=$(param vdiskfs.scatter)
    scatter=${scatter:-16}
    echo "VDISKFS-MARK parallel-start"
    # 1. Block i ($kib KiB) to block jobs+i, by $jobs dd processes at once, O_DIRECT both ways:
    # large requests from processes that overlap.
    pids=""
    i=0
    while [ "$i" -lt "$jobs" ]; do
        dd if="$parallel" of="$parallel" bs="${kib}K" count=1 skip="$i" seek=$((jobs + i)) \
            iflag=direct oflag=direct conv=notrunc 2>/dev/null &
        pids="$pids $!"
        i=$((i + 1))
    done
    failed=0
    for pid in $pids; do
        wait "$pid" || failed=$((failed + 1))
    done
    # 2. 4 KiB block i to every other 4 KiB block of the area after those copies, through the
    # page cache, then one sync: writeback plugs the scattered pages (no two adjacent, so no
    # merging) and hands them to the driver 16 at a time, one kick per batch -- requests that
    # sit in the ring together, whatever the timing. The shell holds DEV open meanwhile: the
    # last close of a block device writes its dirty pages back, one dd at a time.
    exec 3<"$parallel"
    area=$((2 * jobs * kib / 4))
    i=0
    while [ "$i" -lt "$scatter" ]; do
        dd if="$parallel" of="$parallel" bs=4K count=1 skip="$i" seek=$((area + 2 * i)) \
            conv=notrunc 2>/dev/null || failed=$((failed + 1))
        i=$((i + 1))
    done
    sync
    exec 3<&-
    echo "VDISKFS-MARK parallel-end"
    echo "VDISKFS-GUEST: parallel copies done: $jobs jobs, $scatter scattered, $failed failed"
fi

queue_limits() {
    [ -d /sys/block ] || mount -t sysfs sysfs /sys
    q=/sys/block/${1#/dev/}/queue
    echo "VDISKFS-GUEST: queue $1 discard_max_bytes=$(cat $q/discard_max_bytes)" \
        "discard_granularity=$(cat $q/discard_granularity)" \
        "max_discard_segments=$(cat $q/max_discard_segments)" \
        "write_zeroes_max_bytes=$(cat $q/write_zeroes_max_bytes)"
}

trim=$(param vdiskfs.trim)
if [ -n "$trim" ]; then
    queue_limits "$trim"
    mkdir -p /mnt && mount -t ext4 "$trim" /mnt
    rm -f "/mnt/$(param vdiskfs.trim_rm)"
    sync
    echo "VDISKFS-GUEST: fstrim $(fstrim -v /mnt 2>&1)"
    umount /mnt
    sync "$trim"  # a FLUSH: the image's metadata (and freed clusters) reach the host
fi

zeroes=$(param vdiskfs.zeroes)
if [ -n "$zeroes" ]; then
    queue_limits "$zeroes"
    mkdir -p /tools && mount -t ext4 -o ro "$(param vdiskfs.tools)" /tools
    if /tools/vdiskfs-zeroes "$zeroes" "$(param vdiskfs.zeroes_ops)" && sync "$zeroes"; then
        echo "VDISKFS-GUEST: zeroes done"
    else
        echo "VDISKFS-GUEST: zeroes FAILED"
    fi
    umount /tools
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
