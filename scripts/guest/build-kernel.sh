#!/usr/bin/env bash
# Build the emulator's test guest kernel: Debian's linux-source-6.1, `make tinyconfig`, then the
# project's fragment scripts/guest/kernel.config. The result is cached in
#   ${VDISKFS_CACHE:-~/.cache/vdiskfs}/guest/kernel-<key>/{vmlinux,bzImage,config}
# where <key> hashes the fragments and the source package version, so the kernel is rebuilt only
# when one of them changes. Prints the vmlinux path on stdout (last line); progress on stderr.
#
# With --modules, the "modules" variant: kernel-modules.config on top of kernel.config (virtio and
# virtio_blk as loadable modules, like a distribution kernel), built in a source tree of its own
# and cached apart, with its modules installed under kernel-<key>/modules/lib/modules/<version>/
# (depmod'ed) for scripts/guest/build-stock-initramfs.sh.
#
#   scripts/guest/build-kernel.sh [--modules]            build (or reuse), print the vmlinux path
#   scripts/guest/build-kernel.sh [--modules] --print    print the path if cached, else exit 1
#   JOBS=4 scripts/guest/build-kernel.sh                 parallel make (default 2)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
fragments=("$here/kernel.config")
variant=
print=
for arg in "$@"; do
  case $arg in
    --modules) variant=modules; fragments+=("$here/kernel-modules.config") ;;
    --print) print=1 ;;
    *) echo "usage: build-kernel.sh [--modules] [--print]" >&2; exit 2 ;;
  esac
done
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
    flock /var/lock/vdiskfs-apt apt-get update -qq
    flock /var/lock/vdiskfs-apt apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

source_version() {
  dpkg-query -W -f='${Version}' "$source_pkg" 2>/dev/null || true
}

cache_key() {
  # The default variant's key is what it was before variants existed: its cache stays valid.
  { cat "${fragments[@]}"; echo "$source_pkg $1"; } | sha256sum | cut -c1-16
}

cached() {
  [[ -f $out/vmlinux && -f $out/bzImage && ( -z $variant || -d $out/modules/lib/modules ) ]]
}

version=$(source_version)
if [[ -n $print ]]; then
  [[ -n $version ]] || exit 1
  out=$cache/kernel-$(cache_key "$version")
  cached || exit 1
  echo "$out/vmlinux"
  exit 0
fi

# kmod: depmod, which modules_install runs to write modules.dep. apt-get under a lock of the
# project's (/var/lock/vdiskfs-apt): parallel test workers may install at once.
need_packages "$source_pkg" build-essential bc flex bison libelf-dev libssl-dev cpio xz-utils \
  ${variant:+kmod}
version=$(source_version)
out=$cache/kernel-$(cache_key "$version")
# The tests run in parallel workers (scripts/test.sh): one build at a time; whoever waited
# finds it cached.
mkdir -p "$cache"
exec 9>"$cache/.build-kernel.lock"
flock 9
if cached; then
  log "cached: $out"
  echo "$out/vmlinux"
  exit 0
fi

tarball=$(ls /usr/src/$source_pkg.tar.* | head -n 1)
# Each variant builds in a tree of its own: switching one tree between configurations would
# rebuild nearly everything (CONFIG_MODULES reaches most headers) every time.
build=$cache/build${variant:+/$variant}
src=$build/$source_pkg
if [[ ! -f $src/.vdiskfs-extracted || $(cat "$src/.vdiskfs-extracted") != "$version" ]]; then
  log "extracting $tarball"
  rm -rf "$src"
  mkdir -p "$build"
  tar -C "$build" -xf "$tarball"
  echo "$version" > "$src/.vdiskfs-extracted"
fi

cd "$src"
log "configuring (tinyconfig + ${fragments[*]})"
make -s tinyconfig >&2
scripts/kconfig/merge_config.sh -m .config "${fragments[@]}" >/dev/null
make -s olddefconfig >&2
# merge_config reports overrides but not options that Kconfig then changed (a dependency
# missing, another option selecting one we turned off): check every option of the fragments,
# the last fragment's value where several set it.
declare -A want=()
while IFS= read -r line; do
  if [[ $line =~ ^(CONFIG_[A-Z0-9_]+)=(.*)$ ]]; then
    want[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
  elif [[ $line =~ ^#\ (CONFIG_[A-Z0-9_]+)\ is\ not\ set$ ]]; then
    want[${BASH_REMATCH[1]}]=n
  fi
done < <(cat "${fragments[@]}")
missing=()
for option in "${!want[@]}"; do
  if [[ ${want[$option]} == n ]]; then
    ! grep -q "^$option=" .config || missing+=("$option=n")
  else
    grep -qx "$option=${want[$option]}" .config || missing+=("$option=${want[$option]}")
  fi
done
if ((${#missing[@]})); then
  log "warning: not in the final .config: ${missing[*]}"
fi

log "building with make -j$jobs (about 8 minutes on 2 cores)"
start=$(date +%s)
make -s -j"$jobs" vmlinux bzImage ${variant:+modules} >&2
log "built in $(( $(date +%s) - start )) s"

tmp=$out.tmp.$$
rm -rf "$tmp"
mkdir -p "$tmp"
if [[ -n $variant ]]; then
  make -s INSTALL_MOD_PATH="$tmp/modules" INSTALL_MOD_STRIP=1 modules_install >&2
fi
cp vmlinux "$tmp/vmlinux"
cp arch/x86/boot/bzImage "$tmp/bzImage"
cp .config "$tmp/config"
echo "$source_pkg $version" > "$tmp/source"
rm -rf "$out"
mv "$tmp" "$out"
log "cached: $out"
echo "$out/vmlinux"
