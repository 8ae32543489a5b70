"""``python -m emulator``: the ``vdiskfs boot`` command on its own."""

from __future__ import annotations

import argparse
import sys

from emulator.cli import add_boot_arguments, run_boot
from vdiskfs.urlargs import hide_credentials


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # this process's own command line
        hide_credentials()
    parser = argparse.ArgumentParser(
        prog="python -m emulator",
        description="Boot a Linux kernel under KVM with disks served by the vdiskfs stack.",
    )
    add_boot_arguments(parser)
    return run_boot(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
