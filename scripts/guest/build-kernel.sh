#!/usr/bin/env bash
# Build the emulator's test guest kernel: Debian's linux-source-6.1, `make tinyconfig`, then the
# project's fragment scripts/guest/kernel.config. The result is cached in
#   ${VDISKFS_CACHE:-~/.cache/vdiskfs}/guest/kernel-<key>/{vmlinux,bzImage,config}
# where <key> hashes the fragment and the source package version, so the kernel is rebuilt only
# when one of them changes. Prints the vmlinux path on stdout (last line); progress on stderr.
#
#   scripts/guest/build-kernel.sh            build (or reuse) and print the vmlinux path
#   scripts/guest/build-kernel.sh --print    print the path if cached, exit 1 otherwise
#   JOBS=4 scripts/guest/build-kernel.sh     parallel make (default 2)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
fragment=$here/kernel.config
cache=${VDISKFS_CACHE:-$HOME/.cache/vdiskfs}/guest
jobs=${JOBS:-2}
source_pkg=linux-source-6.1

log() { echo "build-kernel: $*" >&2; }

need_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

source_version() {
  dpkg-query -W -f='${Version}' "$source_pkg" 2>/dev/null || true
}

cache_key() {
  { cat "$fragment"; echo "$source_pkg $1"; } | sha256sum | cut -c1-16
}

version=$(source_version)
if [[ ${1:-} == --print ]]; then
  [[ -n $version ]] || exit 1
  out=$cache/kernel-$(cache_key "$version")
  [[ -f $out/vmlinux ]] || exit 1
  echo "$out/vmlinux"
  exit 0
fi

need_packages "$source_pkg" build-essential bc flex bison libelf-dev libssl-dev cpio xz-utils
version=$(source_version)
out=$cache/kernel-$(cache_key "$version")
if [[ -f $out/vmlinux && -f $out/bzImage ]]; then
  log "cached: $out"
  echo "$out/vmlinux"
  exit 0
fi

tarball=$(ls /usr/src/$source_pkg.tar.* | head -n 1)
build=$cache/build
src=$build/$source_pkg
if [[ ! -f $src/.vdiskfs-extracted || $(cat "$src/.vdiskfs-extracted") != "$version" ]]; then
  log "extracting $tarball"
  rm -rf "$src"
  mkdir -p "$build"
  tar -C "$build" -xf "$tarball"
  echo "$version" > "$src/.vdiskfs-extracted"
fi

cd "$src"
log "configuring (tinyconfig + $fragment)"
make -s tinyconfig >&2
scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null
make -s olddefconfig >&2
# merge_config reports overrides but not options that Kconfig then changed (a dependency
# missing, another option selecting one we turned off): check every line of the fragment.
missing=()
while IFS= read -r line; do
  if [[ $line =~ ^(CONFIG_[A-Z0-9_]+)=(.*)$ ]]; then
    grep -qx "${BASH_REMATCH[1]}=${BASH_REMATCH[2]}" .config || missing+=("$line")
  elif [[ $line =~ ^#\ (CONFIG_[A-Z0-9_]+)\ is\ not\ set$ ]]; then
    ! grep -q "^${BASH_REMATCH[1]}=" .config || missing+=("${BASH_REMATCH[1]}=n")
  fi
done < "$fragment"
if ((${#missing[@]})); then
  log "warning: not in the final .config: ${missing[*]}"
fi

log "building with make -j$jobs (about 8 minutes on 2 cores)"
start=$(date +%s)
make -s -j"$jobs" vmlinux bzImage >&2
log "built in $(( $(date +%s) - start )) s"

tmp=$out.tmp.$$
rm -rf "$tmp"
mkdir -p "$tmp"
cp vmlinux "$tmp/vmlinux"
cp arch/x86/boot/bzImage "$tmp/bzImage"
cp .config "$tmp/config"
echo "$source_pkg $version" > "$tmp/source"
rm -rf "$out"
mv "$tmp" "$out"
log "cached: $out"
echo "$out/vmlinux"
