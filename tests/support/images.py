"""Build test images with the reference tools (qemu-img, qemu-io) and read QEMU's view of them.

Every image a test reads is made here at test time, and every expectation comes from
``qemu-img convert -O raw`` of the same image: QEMU is the reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"


def run(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a tool; on failure the error shows the command and its output."""
    cmd = [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def qemu_img(*args: str | os.PathLike[str]) -> str:
    return run(QEMU_IMG, *args).stdout


def qemu_io(image: str | os.PathLike[str], *commands: str, fmt: str | None = None,
            options: str | None = None) -> str:
    """Run qemu-io commands (``write -P 0xab 0 64k``...) against an image, writably."""
    args: list[str | os.PathLike[str]] = [QEMU_IO]
    if options is not None:
        args += ["--image-opts", options]
    else:
        if fmt is not None:
            args += ["-f", fmt]
        args.append(image)
    for command in commands:
        args += ["-c", command]
    return run(*args).stdout


def create(path: str | os.PathLike[str], size: int | str, fmt: str = "qcow2",
           **options: Any) -> Path:
    """``qemu-img create -f fmt -o k=v,... path size``; ``backing``/``backing_fmt`` as -b/-F."""
    args: list[str | os.PathLike[str]] = [QEMU_IMG, "create", "-q", "-f", fmt]
    backing = options.pop("backing", None)
    backing_fmt = options.pop("backing_fmt", None)
    if backing is not None:
        args += ["-b", str(backing)]
        if backing_fmt is not None:
            args += ["-F", backing_fmt]
    if options:
        args += ["-o", ",".join(f"{k}={_opt(v)}" for k, v in options.items())]
    args += [path, str(size)]
    run(*args)
    return Path(path)


def _opt(value: Any) -> str:
    if value is True:
        return "on"
    if value is False:
        return "off"
    return str(value)


def info(path: str | os.PathLike[str], *extra: str) -> dict[str, Any]:
    return json.loads(qemu_img("info", "--output=json", *extra, path))


def reference_raw(image: str | os.PathLike[str], out: str | os.PathLike[str],
                  fmt: str | None = None) -> Path:
    """QEMU's guest view of ``image`` as a raw file."""
    args: list[str | os.PathLike[str]] = ["convert", "-O", "raw"]
    if fmt is not None:
        args += ["-f", fmt]
    qemu_img(*args, image, out)
    return Path(out)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def random_bytes(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def write_pattern_file(path: str | os.PathLike[str], seed: int, length: int) -> Path:
    Path(path).write_bytes(random_bytes(seed, length))
    return Path(path)
