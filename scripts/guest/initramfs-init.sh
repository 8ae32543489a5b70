#!/bin/sh
# /init of the initramfs that scripts/guest/build-stock-initramfs.sh builds for a kernel whose
# virtio drivers are modules (Debian's stock kernels, the test kernel's "modules" variant). Static
# busybox; no udev. It
#   1. insmods the modules listed in /lib/modules/vdiskfs-load, in that (dependency) order;
#   2. waits (rootdelay=SECONDS, default 30) for the device named by root= on the kernel command
#      line: /dev/NAME, UUID=, LABEL= (busybox findfs) or PARTUUID= (GPT partition GUID or MBR
#      SSSSSSSS-PP, read from the partition tables here: nothing else in busybox knows them);
#   3. mounts it on /root (read-only unless "rw"; rootfstype=, rootflags= as the kernel takes
#      them), moves /dev there and switch_roots to init= (default /sbin/init).
# Each step prints a "vdiskfs-initramfs: " line with the guest's uptime; the boot tests, the VMM's
# milestones (emulator/console.py) and scripts/bench/boot.py match them. On failure it says what
# failed and starts a shell on the console (powering off when the shell ends: no terminal).
#
# With VDISKFS_INITRAMFS_LIB=1 in the environment, sourcing this file only defines the functions
# (tests/emulator/test_initramfs.py runs the partition-table readers on the host).

# Where KVM is emulated every process costs about a second (its page faults and system calls run
# in the emulated kernel), a fork for $(...) alone a good part of that: the helpers below use
# shell builtins and set variables rather than print what a caller would capture.

say() {
    read -r up _ < /proc/uptime 2>/dev/null
    echo "vdiskfs-initramfs: $* (${up:-?} s)"
}

param() { # NAME: $value = the value of NAME= on the kernel command line (the last one wins)
    value=
    for word in $cmdline; do
        case "$word" in "$1="*) value=${word#*=};; esac
    done
}

has_word() { # WORD: whether the kernel command line holds WORD on its own
    for word in $cmdline; do
        [ "$word" = "$1" ] && return 0
    done
    return 1
}

le() { # OFFSET COUNT BYTE...: $value = the little-endian integer of COUNT bytes at OFFSET
    count=$2
    shift $(($1 + 2))
    v=
    while [ "$count" -gt 0 ]; do
        v=$1$v
        shift
        count=$((count - 1))
    done
    value=$((0x$v))
}

partuuid_of() { # DISK PARTNO: $partuuid = the PARTUUID the kernel gives partition PARTNO of DISK
    # Sectors 0 and 1 (512 bytes each here): the MBR and, behind a protective MBR (first
    # entry of type 0xee), the GPT header.
    head=$(od -v -A n -t x1 -N 1024 "$1" 2>/dev/null)
    # shellcheck disable=SC2086
    set -- "$1" "$2" $head
    [ $# -eq 1026 ] || return 1
    eval "signature=\${513}\${514} type=\${453}"
    [ "$signature" = 55aa ] || return 1
    if [ "$type" = ee ]; then
        le $((512 + 72)) 8 $head
        entries=$value
        le $((512 + 84)) 4 $head
        # The entry's unique partition GUID (at 16), mixed-endian, as the kernel prints it.
        # shellcheck disable=SC2046
        set -- $(od -v -A n -t x1 -j $((entries * 512 + ($2 - 1) * value + 16)) -N 16 "$1" \
                 2>/dev/null)
        [ $# -eq 16 ] || return 1
        partuuid="$4$3$2$1-$6$5-$8$7-$9${10}-${11}${12}${13}${14}${15}${16}"
    else
        # MBR: the disk signature and the partition number.
        number=$2
        le 440 4 $head
        partuuid=$(printf '%08x-%02x' "$value" "$number")
    fi
}

find_partuuid() { # UUID: $dev = the partition whose PARTUUID is UUID
    for part in /sys/class/block/*; do
        [ -f "$part/partition" ] || continue
        read -r number < "$part/partition"
        # The disk is the partition's parent directory in sysfs.
        cd -P "$part/.." || continue
        disk=${PWD##*/}
        cd /
        partuuid_of "/dev/$disk" "$number" || continue
        [ "$partuuid" = "$1" ] && dev=/dev/${part##*/} && return 0
    done
    return 1
}

resolve_root() { # ROOT (the root= value): $dev = its /dev path, when it is there
    dev=
    case "$1" in
        UUID=*|LABEL=*) dev=$(findfs "$1" 2>/dev/null) ;;
        PARTUUID=*) find_partuuid "$partuuid_wanted" ;;
        /dev/*) [ -b "$1" ] && dev=$1 ;;
    esac
    [ -n "$dev" ]
}

block_devices() { # $blocks = the names of the block devices the kernel has
    blocks=
    for block in /sys/class/block/*; do blocks="$blocks ${block##*/}"; done
}

rescue() {
    say "FAILED: $*"
    echo "vdiskfs-initramfs: starting a shell on the console (exit powers off)"
    busybox --install -s /bin 2>/dev/null
    sh
    poweroff -f
}

[ -n "$VDISKFS_INITRAMFS_LIB" ] && return 0

export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
read -r cmdline < /proc/cmdline
say "started"

read -r _ _ version _ < /proc/version
while read -r module; do
    name=${module%.ko}
    insmod "/lib/modules/$version/$module" || rescue "insmod $name"
    say "$name loaded"
done < /lib/modules/vdiskfs-load
block_devices
say "modules loaded; block devices:$blocks"

param root
root=$value
[ -n "$root" ] || rescue "no root= on the kernel command line"
case "$root" in
    UUID=*|LABEL=*|/dev/*) ;;
    PARTUUID=*) partuuid_wanted=$(echo "${root#PARTUUID=}" | tr 'A-F' 'a-f') ;;
    *) rescue "root=$root: give /dev/NAME, UUID=, LABEL= or PARTUUID=" ;;
esac
param rootdelay
tenths=$((${value:-30} * 10))
until resolve_root "$root"; do
    block_devices
    [ "$tenths" -gt 0 ] || rescue "root $root not found (block devices:$blocks)"
    tenths=$((tenths - 1))
    usleep 100000
done
say "found root $dev (root=$root)"

mode=ro
has_word rw && mode=rw
param rootflags
flags=$value
param rootfstype
mount ${value:+-t "$value"} -o "$mode${flags:+,$flags}" "$dev" /root \
    || rescue "mount $dev on /root"
say "mounted root $dev $mode"

param init
init=${value:-/sbin/init}
[ -e "/root$init" ] || [ -L "/root$init" ] || rescue "no $init on the root file system"
say "switching root to $init"
if [ -d /root/dev ]; then
    mount --move /dev /root/dev
else
    umount /dev
fi
umount /sys /proc
exec switch_root /root "$init" "$@"
