# Sourced by the guest builders: populate a directory with static busybox and its applets.
# Usage: populate_busybox DIR
need_busybox() {
  if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed"; then
    echo "guest: installing busybox-static" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends busybox-static >/dev/null
  fi
}

populate_busybox() {
  local dir=$1 applet
  mkdir -p "$dir"/{bin,sbin,dev,proc,sys,mnt,tmp,etc}
  cp /bin/busybox "$dir/bin/busybox"
  for applet in $("$dir/bin/busybox" --list); do
    [[ $applet == busybox ]] && continue
    ln -sf busybox "$dir/bin/$applet"
  done
}
