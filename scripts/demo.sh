#!/usr/bin/env bash
# The main job on a fresh machine: install everything, build a sample image, mount it.
#   scripts/demo.sh              set up, build demo/sample.qcow2, mount it at demo/mnt
#   scripts/demo.sh --unmount    unmount it again
# The sample is a 64 MiB GPT disk with an ext4 partition holding a few files, converted to a
# compressed qcow2 (demo/base.qcow2) with an empty qcow2 overlay on top (demo/sample.qcow2), so
# the stats show a two-image chain.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
demo=$top/demo
mnt=$demo/mnt
vdiskfs=$top/.venv/bin/vdiskfs

if [[ ${1:-} == --unmount ]]; then
  "$vdiskfs" unmount "$mnt"
  exit 0
fi

scripts/setup.sh

if grep -qs " $mnt fuse.vdiskfs " /proc/mounts; then
  "$vdiskfs" unmount "$mnt"
fi
mkdir -p "$demo" "$mnt"
if [[ ! -f $demo/sample.qcow2 ]]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/root/etc"
  echo "Hello from inside a qcow2 image, read by vdiskfs." > "$work/root/hello.txt"
  echo "sample" > "$work/root/etc/hostname"
  head -c 3000000 /dev/urandom > "$work/root/random.bin"
  truncate -s 64M "$work/disk.img"
  printf 'label: gpt\nstart=2048, size=61440, type=linux, name="root"\nsize=+, type=linux, name="spare"\n' \
    | sfdisk -q "$work/disk.img"
  truncate -s $((61440 * 512)) "$work/root.ext4"
  mkfs.ext4 -q -F -L root -d "$work/root" "$work/root.ext4"
  dd if="$work/root.ext4" of="$work/disk.img" bs=512 seek=2048 conv=notrunc status=none
  qemu-img convert -q -c -f raw -O qcow2 "$work/disk.img" "$demo/base.qcow2"
  qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$demo/sample.qcow2"
fi

"$vdiskfs" mount "$demo/sample.qcow2" "$mnt"

cat <<TXT

Mounted demo/sample.qcow2 (an overlay over demo/base.qcow2) at $mnt:
$(ls -l "$mnt")

Try:
  $vdiskfs info demo/sample.qcow2
  ls -l $mnt
  cat $mnt/stats/sample/tree
  mkdir -p /tmp/demo-root && mount -o loop,ro $mnt/sample-part1.raw /tmp/demo-root && cat /tmp/demo-root/hello.txt
  cat $mnt/stats/sample/0-qcow2 | grep -E '"(rd_bytes|l2_cache_hits|backing_bytes)"'
  umount /tmp/demo-root; scripts/demo.sh --unmount
TXT
