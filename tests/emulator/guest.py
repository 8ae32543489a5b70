"""Helpers for the tests that boot a guest: the test kernel and disk (built by
scripts/guest/, cached), and running ``python -m emulator`` with a deadline."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
GUEST_SCRIPTS = REPO / "scripts" / "guest"
#: Longest a test boot may take (the test kernel needs ~20-30 s where KVM is emulated).
BOOT_TIMEOUT = 240


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def is_pvm() -> bool:
    """The emulated KVM (kvm_pvm), where guest user mode cannot make system calls."""
    return os.path.isdir("/sys/module/kvm_pvm")


def build_kernel(*, modules: bool = False) -> Path:
    """The test kernel's vmlinux (built on first use, ~8 minutes; then cached); with
    ``modules``, its variant with virtio as modules (scripts/guest/kernel-modules.config)."""
    proc = subprocess.run([str(GUEST_SCRIPTS / "build-kernel.sh"),
                           *(["--modules"] if modules else [])], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"build-kernel.sh failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class RootDisk:
    """The GPT test disk: ext4 root on partition 1, random data on partition 2."""

    path: Path
    data_md5: str
    data_offset: int
    data_size: int = 1 << 20
    root_offset: int = 1 << 20
    root_size: int = 24 << 20

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def build_rootfs(path: Path) -> RootDisk:
    proc = subprocess.run([str(GUEST_SCRIPTS / "build-rootfs.sh"), str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"build-rootfs.sh failed:\n{proc.stderr[-3000:]}")
    values = dict(re.findall(r"^(\w+)=(\S+)$", proc.stdout, re.M))
    return RootDisk(path, values["data_md5"], int(values["data_offset"]))


def build_cloud_image(path: Path, kernel: Path, args: str = "") -> dict[str, str]:
    """The test disk as qcow2 with ``kernel``'s bzImage, config and a grub.cfg in /boot
    (scripts/guest/build-cloud-image.sh); its root_uuid, kernel_version and data_md5."""
    proc = subprocess.run([str(GUEST_SCRIPTS / "build-cloud-image.sh"), str(path),
                           str(kernel.parent), args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"build-cloud-image.sh failed:\n{proc.stderr[-3000:]}")
    return dict(re.findall(r"^(\w+)=(\S+)$", proc.stdout, re.M))


@dataclass
class BootResult:
    returncode: int
    output: str
    stderr: str
    stats: dict[str, Any] | None


def boot(*args: str, stats: Path | None = None, timeout: float = BOOT_TIMEOUT) -> BootResult:
    """Run ``python -m emulator ARGS`` to its end; killed (with its group) at the deadline."""
    cmd = [sys.executable, "-m", "emulator", *args]
    if stats is not None:
        cmd += ["--stats", str(stats)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        out, err = proc.communicate()
        raise AssertionError(
            f"boot did not end within {timeout} s:\n{out.decode(errors='replace')[-4000:]}\n"
            f"{err.decode(errors='replace')[-2000:]}") from None
    data = json.loads(stats.read_text()) if stats is not None and stats.exists() else None
    return BootResult(proc.returncode, out.decode(errors="replace"),
                      err.decode(errors="replace"), data)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the VMM (it unmounts and closes its images), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
