"""The vdiskfs emulator: a small KVM virtual machine monitor whose disks are vdiskfs nodes.

``vdiskfs boot`` (:mod:`emulator.cli`) boots a Linux kernel with a serial console and virtio-blk
disks served by the driver stack; :mod:`emulator.vmm` wires the pieces: ``kvm/`` (the ioctl ABI,
VM and vCPU), ``memory`` (guest RAM), ``loader/`` (vmlinux, bzImage, boot_params),
``arch/x86_64/`` (layout and boot registers), ``devices/`` (serial, i8042, CMOS, virtio-mmio,
virtio-blk). NOTES.md records what was measured on the emulated KVM and what the VMM does
about it.
"""
