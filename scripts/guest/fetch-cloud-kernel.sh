#!/usr/bin/env bash
# Fetch Debian's stock cloud kernel (linux-image-cloud-amd64) without installing it, cached in
#   ${VDISKFS_CACHE:-~/.cache/vdiskfs}/guest/cloud-<version>/{vmlinuz,config,linux-image.deb}
# and print the vmlinuz path (with --deb: the .deb's, whose modules
# scripts/guest/build-stock-initramfs.sh makes the kernel's initramfs from). The bzImage payload
# is LZ4 (legacy frames); `vdiskfs boot` extracts the ELF kernel from it. Where KVM is emulated
# this kernel boots very slowly (minutes).
#
#   scripts/guest/fetch-cloud-kernel.sh [--deb]
set -euo pipefail
want=vmlinuz
case ${1:-} in
  --deb) want=linux-image.deb ;;
  "") ;;
  *) echo "usage: fetch-cloud-kernel.sh [--deb]" >&2; exit 2 ;;
esac
cache=${VDISKFS_CACHE:-$HOME/.cache/vdiskfs}/guest
mkdir -p "$cache"
# The meta package depends on the versioned image package: resolve and download that one.
meta_dep=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
  | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[[ -n $meta_dep ]] || { echo "fetch-cloud-kernel: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
out=$cache/cloud-${meta_dep#linux-image-}
# Parallel test workers: one download at a time; whoever waited finds it there.
exec 9>"$cache/.fetch-cloud-kernel.lock"
flock 9
if [[ -f $out/vmlinuz && -f $out/linux-image.deb ]]; then
  echo "$out/$want"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
apt-get download -qq "$meta_dep" 2>&1 | grep -v "Download is performed unsandboxed" >&2 || true
deb=$(ls ./*.deb 2>/dev/null | head -n 1)
[[ -n $deb ]] || { echo "fetch-cloud-kernel: apt-get download $meta_dep failed" >&2; exit 1; }
dpkg-deb -x "$deb" extracted
mkdir -p "$out.tmp"
cp extracted/boot/vmlinuz-* "$out.tmp/vmlinuz"
cp extracted/boot/config-* "$out.tmp/config" 2>/dev/null || true
mv "$deb" "$out.tmp/linux-image.deb"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out/$want"
