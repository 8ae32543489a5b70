#!/usr/bin/env bash
# Fetch Debian's stock cloud kernel (linux-image-cloud-amd64) without installing it, cached in
#   ${VDISKFS_CACHE:-~/.cache/vdiskfs}/guest/cloud-<version>/vmlinuz
# and print the vmlinuz path. The bzImage payload is LZ4 (legacy frames); `vdiskfs boot`
# extracts the ELF kernel from it. Where KVM is emulated this kernel boots very slowly (minutes).
set -euo pipefail
cache=${VDISKFS_CACHE:-$HOME/.cache/vdiskfs}/guest
mkdir -p "$cache"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
# The meta package depends on the versioned image package: resolve and download that one.
meta_dep=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
  | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[[ -n $meta_dep ]] || { echo "fetch-cloud-kernel: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
out=$cache/cloud-${meta_dep#linux-image-}
if [[ -f $out/vmlinuz ]]; then
  echo "$out/vmlinuz"
  exit 0
fi
apt-get download -qq "$meta_dep" >&2
dpkg-deb -x ./*.deb extracted
mkdir -p "$out.tmp"
cp extracted/boot/vmlinuz-* "$out.tmp/vmlinuz"
cp extracted/boot/config-* "$out.tmp/config" 2>/dev/null || true
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out/vmlinuz"
