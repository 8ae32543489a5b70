#!/usr/bin/env bash
# Build the emulator's test disk: a GPT raw image with
#   partition 1 "root": ext4 holding static busybox and /sbin/init = scripts/guest/init.sh
#   partition 2 "data": random bytes, whose md5 the guest checks (vdiskfs.md5dev=/dev/vda2)
# Prints "data_md5=<hex>" and "data_offset=<bytes>" on stdout.
#
#   scripts/guest/build-rootfs.sh OUT.img [ROOT_MIB [DATA_MIB [BOOT_DIR]]]  (defaults: 24 and 1)
#
# BOOT_DIR's files become the root's /boot (a kernel, grub/grub.cfg...: an image that
# `vdiskfs boot --disk` boots without --kernel); ROOT_UUID=<uuid> in the environment sets the
# root file system's UUID.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/busybox-root.sh"

out=${1:?usage: build-rootfs.sh OUT.img [ROOT_MIB [DATA_MIB [BOOT_DIR]]]}
root_mib=${2:-24}
data_mib=${3:-1}
boot_dir=${4:-}

need_busybox

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
populate_busybox "$tmp/root"
install -m 0755 "$here/init.sh" "$tmp/root/sbin/init"
if [[ -n $boot_dir ]]; then
  mkdir -p "$tmp/root/boot"
  cp -r "$boot_dir/." "$tmp/root/boot/"
fi

# 1 MiB alignment, the two partitions, 1 MiB for the backup GPT.
start=2048
root_sectors=$((root_mib * 2048))
data_start=$((start + root_sectors))
data_sectors=$((data_mib * 2048))
total_mib=$((1 + root_mib + data_mib + 1))
rm -f "$out"
truncate -s "${total_mib}M" "$out"
sgdisk -o \
  -n "1:$start:+$root_sectors" -t 1:8300 -c 1:root \
  -n "2:$data_start:+$data_sectors" -t 2:8300 -c 2:data "$out" >/dev/null
mkfs.ext4 -q -F -L vdiskfs-root ${ROOT_UUID:+-U "$ROOT_UUID"} -E "offset=$((start * 512))" -d "$tmp/root" "$out" "${root_mib}M"
dd if=/dev/urandom of="$out" bs=512 seek="$data_start" count="$data_sectors" conv=notrunc \
  status=none
md5=$(dd if="$out" bs=512 skip="$data_start" count="$data_sectors" status=none | md5sum | cut -d' ' -f1)
echo "data_md5=$md5"
echo "data_offset=$((data_start * 512))"
