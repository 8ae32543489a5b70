#!/usr/bin/env bash
# Install everything vdiskfs and its tests need on Debian 12, as root: apt packages, then a
# virtual environment in .venv with the project installed in it. Idempotent and quick when
# nothing changed (a stamp in .venv records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  fuse3 libfuse3-dev pkg-config gcc python3-dev   # pyfuse3 builds against libfuse3
  qemu-utils                                      # qemu-img, qemu-io, qemu-nbd: the reference
  qemu-system-common                              # qemu-storage-daemon: the benchmark peer
  fdisk gdisk e2fsprogs dosfstools mtools         # partitioned test images
  fio zstd util-linux
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
fi

PYTHON=${PYTHON:-python3}
stamp=.venv/.vdiskfs-setup
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $($PYTHON --version 2>&1)"
if [[ ! -x .venv/bin/python || ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
  echo "setup: creating .venv" >&2
  if ! $PYTHON -m venv --clear .venv 2>/dev/null; then
    apt-get install -y -qq python3-venv >/dev/null
    $PYTHON -m venv --clear .venv
  fi
  if ! .venv/bin/pip install -e '.[test]' > .venv/setup.log 2>&1; then
    tail -n 30 .venv/setup.log >&2
    echo "setup: pip install failed; full log in .venv/setup.log" >&2
    exit 1
  fi
  .venv/bin/python -c 'import pyfuse3, trio, zstandard' # fail loudly if the build failed
  echo "$want" > "$stamp"
fi
