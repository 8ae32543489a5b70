#!/usr/bin/env bash
# Build the emulator's test initramfs: an *uncompressed* newc cpio with static busybox and
# /init = scripts/guest/init.sh (the kernel unpacks a gzip'd one slowly where KVM is emulated).
#
#   scripts/guest/build-initramfs.sh OUT.cpio
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/busybox-root.sh"

out=${1:?usage: build-initramfs.sh OUT.cpio}
need_busybox
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
populate_busybox "$tmp/root"
install -m 0755 "$here/init.sh" "$tmp/root/init"
write_cpio "$tmp/root" "$out"
realpath "$out"
