#!/usr/bin/env bash
# Build a disk that boots as a cloud image does, with no --kernel: the test disk of
# build-rootfs.sh (GPT, ext4 busybox root on partition 1, data on 2) whose root also holds
#   /boot/vmlinuz-<version>    the kernel (a bzImage)
#   /boot/config-<version>     its .config (vdiskfs boot reads it to warn about ACPI)
#   /boot/initrd.img-<version> with INITRD=FILE
#   /boot/grub/grub.cfg        one entry, as grub-mkconfig writes it: search --fs-uuid, linux
#                              root=/dev/vda1 ro ARGS (no console=: the VMM adds it), initrd
# converted to qcow2. Prints "root_uuid=", "kernel_version=", "data_md5=" and "data_offset=".
#
#   scripts/guest/build-cloud-image.sh OUT.qcow2 KERNEL_DIR [ARGS]
# KERNEL_DIR is a build-kernel.sh cache directory (bzImage, config, source: the version is
# <upstream>-vdiskfs) or a fetch-cloud-kernel.sh one (vmlinuz, config; cloud-<version>: a
# Debian kernel's own version); VERSION=<version> overrides either.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

out=${1:?usage: build-cloud-image.sh OUT.qcow2 KERNEL_DIR [ARGS]}
kernel_dir=${2:?usage: build-cloud-image.sh OUT.qcow2 KERNEL_DIR [ARGS]}
args=${3:-}
if [[ -f $kernel_dir/bzImage ]]; then
  kernel=$kernel_dir/bzImage
  # "linux-source-6.1 6.1.192-3" -> 6.1.192-vdiskfs: the shape of a Debian kernel's version.
  version=${VERSION:-$(awk '{ sub(/-.*/, "", $2); print $2 "-vdiskfs" }' "$kernel_dir/source")}
else
  kernel=$kernel_dir/vmlinuz
  name=$(basename "$kernel_dir")
  version=${VERSION:-${name#cloud-}}
fi
uuid=$(cat /proc/sys/kernel/random/uuid)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
boot=$tmp/boot
mkdir -p "$boot/grub"
cp "$kernel" "$boot/vmlinuz-$version"
[[ ! -f $kernel_dir/config ]] || cp "$kernel_dir/config" "$boot/config-$version"
initrd_line=
if [[ -n ${INITRD:-} ]]; then
  cp "$INITRD" "$boot/initrd.img-$version"
  initrd_line="	initrd	/boot/initrd.img-$version"
fi
cat > "$boot/grub/grub.cfg" <<CFG
# Written by scripts/guest/build-cloud-image.sh in grub-mkconfig's style.
if [ -s \$prefix/grubenv ]; then
  load_env
fi
if [ "\${next_entry}" ] ; then
   set default="\${next_entry}"
else
   set default="0"
fi
if [ x"\${feature_menuentry_id}" = xy ]; then
  menuentry_id_option="--id"
else
  menuentry_id_option=""
fi
set timeout=1
menuentry 'vdiskfs test guest' --class gnu-linux \$menuentry_id_option 'gnulinux-simple-$uuid' {
	insmod part_gpt
	insmod ext2
	search --no-floppy --fs-uuid --set=root $uuid
	echo	'Loading Linux $version ...'
	linux	/boot/vmlinuz-$version root=/dev/vda1 ro $args
$initrd_line
}
CFG
raw=$tmp/disk.raw
# Busybox takes about 2 MiB of the default 24: room for the kernel and initrd on top.
root_mib=$(( 24 + $(du -sm "$boot" | cut -f1) ))
ROOT_UUID=$uuid "$here/build-rootfs.sh" "$raw" "$root_mib" 1 "$boot"
qemu-img convert -f raw -O qcow2 "$raw" "$out"
echo "root_uuid=$uuid"
echo "kernel_version=$version"
