#!/usr/bin/env bash
# Install everything vdiskfs and its tests need on Debian 12, as root: apt packages, then a
# virtual environment in .venv with pyfuse3 built from its PyPI sdist with the project's patch
# (scripts/pyfuse3/README) and the project installed in it. Idempotent and quick when nothing
# changed (stamps in .venv record what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  fuse3 libfuse3-dev pkg-config gcc python3-dev   # pyfuse3 builds against libfuse3
  patch                                           # with scripts/pyfuse3's patch
  qemu-utils                                      # qemu-img, qemu-io, qemu-nbd: the reference
  qemu-system-common                              # qemu-storage-daemon: the benchmark peer
  fdisk gdisk e2fsprogs dosfstools mtools         # partitioned test images
  fio zstd util-linux
  nginx-light openssl                             # https tests: a local server, its CA
  nbdkit                                          # a second NBD server for the nbd tests
  ceph-mon ceph-osd ceph-common radosgw           # the throwaway cluster of the ceph tests
  python3-rados python3-rbd                       # librbd's binding, for the rbd node
  qemu-block-extra                                # QEMU's rbd and curl drivers: the reference
  acpica-tools                                    # iasl: disassembles the VMM's ACPI tables in tests
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The tests run nginx themselves, on free ports (tests/support/http_server.py); the system
  # service that Debian enables and starts when the package is installed is not wanted.
  if [[ " ${missing[*]} " == *" nginx-light "* && -d /run/systemd/system ]]; then
    systemctl disable --now nginx >/dev/null 2>&1 || true
  fi
  # Likewise the ceph tests start their own cluster (tests/support/ceph.py); Debian's units
  # start nothing without /etc/ceph, but none is left enabled either.
  if [[ " ${missing[*]} " == *" ceph-"* && -d /run/systemd/system ]]; then
    systemctl disable --now ceph.target ceph-mon.target ceph-osd.target \
      ceph-radosgw.target >/dev/null 2>&1 || true
  fi
fi

# pyfuse3: the sdist, checked, with the patch applied, installed under a local version that
# pyproject's "pyfuse3>=3.3,<3.6" accepts, before the project, so that pip keeps it.
PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PYFUSE3_PATCH=scripts/pyfuse3/pyfuse3-3.5.0-lseek-fallocate-init.patch
PYFUSE3_LOCAL_VERSION=$PYFUSE3_VERSION+vdiskfs.1

fail() { # LOG MESSAGE
  tail -n 30 "$1" >&2
  echo "setup: $2; full log in $1" >&2
  exit 1
}

build_pyfuse3() {
  local log=.venv/pyfuse3.log src=.venv/pyfuse3
  local sdist=$src/pyfuse3-$PYFUSE3_VERSION.tar.gz tree=$src/pyfuse3-$PYFUSE3_VERSION
  echo "setup: building pyfuse3 $PYFUSE3_LOCAL_VERSION (sdist + $PYFUSE3_PATCH)" >&2
  mkdir -p "$src"
  : > "$log"
  if ! echo "$PYFUSE3_SHA256  $sdist" | sha256sum --check --status 2>/dev/null; then
    rm -f "$sdist"
    .venv/bin/pip download --no-binary :all: --no-deps -d "$src" "pyfuse3==$PYFUSE3_VERSION" \
      >> "$log" 2>&1 || fail "$log" "downloading the pyfuse3 $PYFUSE3_VERSION sdist failed"
    echo "$PYFUSE3_SHA256  $sdist" | sha256sum --check >> "$log" 2>&1 \
      || fail "$log" "$sdist: its sha256 is not $PYFUSE3_SHA256"
  fi
  rm -rf "$tree"
  tar -xzf "$sdist" -C "$src" --no-same-owner
  patch -d "$tree" -p1 --forward --batch --fuzz=0 < "$PYFUSE3_PATCH" >> "$log" 2>&1 \
    || fail "$log" "$PYFUSE3_PATCH does not apply to pyfuse3 $PYFUSE3_VERSION"
  # The sdist ships the C file that Cython made from the unpatched sources.
  rm -f "$tree/src/pyfuse3/__init__.c"
  # --no-deps: trio comes with the project, at the version pyproject pins.
  SETUPTOOLS_SCM_PRETEND_VERSION=$PYFUSE3_LOCAL_VERSION .venv/bin/pip install --no-deps \
    --force-reinstall "./$tree" >> "$log" 2>&1 || fail "$log" "building pyfuse3 failed"
}

PYTHON=${PYTHON:-python3}
stamp=.venv/.vdiskfs-setup
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $($PYTHON --version 2>&1)"
pyfuse3_stamp=.venv/.vdiskfs-pyfuse3
pyfuse3_want="$PYFUSE3_VERSION $PYFUSE3_SHA256 $(sha256sum "$PYFUSE3_PATCH" | cut -d' ' -f1)"
changed=
if [[ ! -x .venv/bin/python || ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
  echo "setup: creating .venv" >&2
  if ! $PYTHON -m venv --clear .venv 2>/dev/null; then
    apt-get install -y -qq python3-venv >/dev/null
    $PYTHON -m venv --clear .venv
  fi
  changed=project
fi
if [[ ! -f $pyfuse3_stamp || "$(cat "$pyfuse3_stamp")" != "$pyfuse3_want" ]]; then
  build_pyfuse3
  changed+=" pyfuse3"
fi
if [[ $changed == project* ]]; then
  .venv/bin/pip install -e '.[test]' > .venv/setup.log 2>&1 \
    || fail .venv/setup.log "pip install failed"
fi
# Debian's librados/librbd binding (python3-rados, python3-rbd) is built for Debian's Python
# 3.11; any 3.11 venv loads it (the same extension suffix, the stable C API of one minor
# version). Only those two modules are shown to the venv -- a directory of links on sys.path
# through a .pth file -- rather than every system package (--system-site-packages would also
# need the venv made again). Checked on every run: cheap, and it follows the packages being
# installed or removed; a venv of another Python version finds no module of its suffix and
# gets none (the rbd node then says "rbd: needs python3-rbd").
link_ceph_bindings() {
  local site suffix dir=vdiskfs-ceph-bindings module files=()
  read -r site suffix < <(.venv/bin/python -c \
    'import sysconfig as s; print(s.get_path("purelib"), s.get_config_var("EXT_SUFFIX"))')
  for module in rados rbd; do
    files+=("/usr/lib/python3/dist-packages/$module$suffix")
  done
  if [[ ! -f ${files[0]} || ! -f ${files[1]} ]]; then
    rm -rf "${site:?}/$dir" "$site/$dir.pth"
    return
  fi
  mkdir -p "$site/$dir"
  ln -sfn "${files[0]}" "${files[1]}" "$site/$dir/"
  # A relative line in a .pth file is taken from site-packages.
  echo "$dir" > "$site/$dir.pth"
}
link_ceph_bindings

if [[ -n $changed ]]; then
  # Fail loudly if a build failed or pip replaced the patched pyfuse3.
  .venv/bin/python -c 'import pyfuse3, trio, zstandard; pyfuse3.Operations.lseek'
  echo "$want" > "$stamp"
  echo "$pyfuse3_want" > "$pyfuse3_stamp"
fi
