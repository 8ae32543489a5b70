# Sourced by the guest builders: static busybox and its applets in a directory, and the
# uncompressed newc cpio that the initramfs builders write (the kernel unpacks a gzip'd one
# slowly where KVM is emulated).
# Usage: need_busybox; populate_busybox DIR [APPLET...]; write_cpio DIR OUT
need_busybox() {
  if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed"; then
    echo "guest: installing busybox-static" >&2
    export DEBIAN_FRONTEND=noninteractive
    flock /var/lock/vdiskfs-apt apt-get update -qq
    flock /var/lock/vdiskfs-apt apt-get install -y -qq --no-install-recommends busybox-static >/dev/null
  fi
  file -L /bin/busybox | grep -q "statically linked" \
    || { echo "guest: /bin/busybox is not static (install busybox-static)" >&2; exit 1; }
}

populate_busybox() { # DIR [APPLET...]: links for the APPLETs given, else for all of them
  local dir=$1 applet applets=("${@:2}")
  mkdir -p "$dir"/{bin,sbin,dev,proc,sys,mnt,tmp,etc}
  cp /bin/busybox "$dir/bin/busybox"
  ((${#applets[@]})) || mapfile -t applets < <("$dir/bin/busybox" --list)
  for applet in "${applets[@]}"; do
    [[ $applet == busybox ]] && continue
    ln -sf busybox "$dir/bin/$applet"
  done
}

write_cpio() {
  local dir=$1 out
  out=$(realpath -m "$2")
  (cd "$dir" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) > "$out"
}
