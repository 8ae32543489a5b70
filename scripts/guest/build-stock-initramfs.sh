#!/usr/bin/env bash
# Build an initramfs for a kernel whose virtio drivers are modules (Debian's stock kernels; the
# test kernel's "modules" variant): an *uncompressed* newc cpio with static busybox, the modules
# that find a virtio-mmio disk taken from the kernel's own modules, and /init =
# scripts/guest/initramfs-init.sh (loads them, waits for root=, mounts it, switch_roots).
#
#   scripts/guest/build-stock-initramfs.sh SOURCE [OUT.cpio]
#
# SOURCE is a kernel's modules: a linux-image-*.deb, a directory holding lib/modules/<version>/
# (an extracted .deb, a `make modules_install INSTALL_MOD_PATH=` tree) or that <version>
# directory itself. The modules are virtio_mmio and virtio_blk (VDISKFS_INITRAMFS_MODULES to
# change them) and ext4 where it is a module, with what they depend on (modules.dep; depmod runs
# on a copy where the tree has none, as in a .deb), in load order; .ko.xz/.gz/.zst are
# decompressed here (busybox insmod may not read them). Modules built into the kernel are skipped.
#
# The cpio is cached as ${VDISKFS_CACHE:-~/.cache/vdiskfs}/guest/initramfs-<version>-<key>.cpio,
# <key> hashing the modules, /init, this script and busybox; its path is printed on stdout (last
# line), after copying it to OUT when given. Progress and errors on stderr.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/busybox-root.sh"

usage="usage: build-stock-initramfs.sh KERNEL.deb|MODULES_DIR [OUT.cpio]"
source=${1:?$usage}
out=${2:-}
cache=${VDISKFS_CACHE:-$HOME/.cache/vdiskfs}/guest
required=(${VDISKFS_INITRAMFS_MODULES:-virtio_mmio virtio_blk})
optional=(ext4)

fail() { echo "build-stock-initramfs: $*" >&2; exit 1; }
log() { echo "build-stock-initramfs: $*" >&2; }

need_kmod() {
  if ! command -v depmod >/dev/null || ! command -v modprobe >/dev/null; then
    log "installing kmod"
    export DEBIAN_FRONTEND=noninteractive
    flock /var/lock/vdiskfs-apt apt-get update -qq
    flock /var/lock/vdiskfs-apt apt-get install -y -qq --no-install-recommends kmod >/dev/null
  fi
}

# The one lib/modules/<version> directory under $1 (or $1 itself), on stdout.
modules_dir() {
  local dirs=()
  if [[ -d $1/kernel || -f $1/modules.order ]]; then
    dirs=("$1")
  else
    shopt -s nullglob
    dirs=("$1"/lib/modules/*/ "$1"/usr/lib/modules/*/)
    shopt -u nullglob
  fi
  ((${#dirs[@]})) || fail "$source: no lib/modules/<version>/ in it (not a kernel's modules)"
  ((${#dirs[@]} == 1)) || fail "$source: modules of several kernels (${dirs[*]}): name one"
  realpath "${dirs[0]}"
}

[[ -e $source ]] || fail "$source: no such file or directory"
need_busybox
need_kmod
PATH=$PATH:/sbin:/usr/sbin
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [[ -f $source ]]; then
  dpkg-deb --fsys-tarfile "$source" > "$tmp/deb.tar" 2>/dev/null \
    || fail "$source: not a .deb (dpkg-deb cannot read it)"
  mkdir "$tmp/deb"
  tar -C "$tmp/deb" -xf "$tmp/deb.tar" --wildcards './lib/modules/*' './usr/lib/modules/*' \
    2>/dev/null || true
  rm "$tmp/deb.tar"
  source_dir=$tmp/deb
else
  source_dir=$source
fi
moddir=$(modules_dir "$source_dir")
version=$(basename "$moddir")
# depmod and modprobe want BASE/lib/modules/<version>; depmod writes next to the modules, so it
# runs on a copy unless they are ours (an extracted .deb).
if [[ ! -f $moddir/modules.dep && $moddir != "$tmp"/* ]]; then
  mkdir -p "$tmp/copy/lib/modules"
  cp -a "$moddir" "$tmp/copy/lib/modules/$version"
  moddir=$tmp/copy/lib/modules/$version
elif [[ $moddir != */lib/modules/"$version" ]]; then
  mkdir -p "$tmp/link/lib/modules"
  ln -s "$moddir" "$tmp/link/lib/modules/$version"
  moddir=$tmp/link/lib/modules/$version
fi
base=${moddir%/lib/modules/"$version"}
if [[ ! -f $moddir/modules.dep ]]; then
  depmod -b "$base" "$version" 2>/dev/null || fail "depmod failed on the modules of $version"
fi

# What to load, in order: modprobe's own resolution (-C /dev/null: not the host's options).
plan=()
for module in "${required[@]}" "${optional[@]}"; do
  if ! lines=$(modprobe -C /dev/null -d "$base" -S "$version" --show-depends "$module" 2>&1)
  then
    [[ " ${optional[*]} " == *" $module "* ]] && continue
    fail "kernel $version has no module $module (and it is not built in): ${lines##*: }"
  fi
  while read -r verb path _; do
    [[ $verb == insmod ]] || continue
    [[ " ${plan[*]} " == *" $path "* ]] || plan+=("$path")
  done <<< "$lines"
done

# The initramfs tree: busybox, the modules (decompressed) and their load list, /init.
root=$tmp/root
# Only the applets /init runs (its rescue shell installs the rest): each file of the cpio costs
# the emulated kernel time to unpack.
populate_busybox "$root" sh mount umount insmod od findfs usleep switch_root poweroff tr
mkdir -p "$root/root" "$root/lib/modules/$version"
# /dev/console for /init's output before devtmpfs is mounted (the kernel's built-in initramfs
# has one too, but not every kernel has that).
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
: > "$root/lib/modules/vdiskfs-load"
for path in "${plan[@]}"; do
  name=$(basename "$path")
  case $name in
    *.ko) cp "$path" "$root/lib/modules/$version/$name" ;;
    *.ko.xz) xz -dc "$path" > "$root/lib/modules/$version/${name%.xz}" ;;
    *.ko.gz) gzip -dc "$path" > "$root/lib/modules/$version/${name%.gz}" ;;
    *.ko.zst) zstd -qdc "$path" > "$root/lib/modules/$version/${name%.zst}" ;;
    *) fail "$path: not a kernel module (.ko, .ko.xz, .ko.gz, .ko.zst)" ;;
  esac
  echo "${name%.ko*}.ko" >> "$root/lib/modules/vdiskfs-load"
done
install -m 0755 "$here/initramfs-init.sh" "$root/init"

key=$( { cat "$0" "$here/busybox-root.sh";
         dpkg-query -W -f='${Version}' busybox-static;
         cd "$root" && find . -type f ! -path ./bin/busybox -print0 | LC_ALL=C sort -z \
           | xargs -0 sha256sum; } | sha256sum | cut -c1-16)
cached=$cache/initramfs-$version-$key.cpio
if [[ -f $cached ]]; then
  log "cached: $cached"
else
  mkdir -p "$cache"
  write_cpio "$root" "$cached.tmp.$$"
  mv "$cached.tmp.$$" "$cached"
  log "kernel $version, modules: $(tr '\n' ' ' < "$root/lib/modules/vdiskfs-load")"
  log "built: $cached"
fi
if [[ -n $out ]]; then
  cp "$cached" "$out"
  realpath "$out"
else
  echo "$cached"
fi
