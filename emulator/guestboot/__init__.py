"""Booting a disk image as it is: the kernel, initrd and command line it would boot, read from
its own file systems (:mod:`.find`), its ``grub.cfg`` followed (:mod:`.grub`)."""

from emulator.guestboot.find import BootChoice, find_boot

__all__ = ["BootChoice", "find_boot"]
