"""The vdiskfs emulator: a small KVM virtual machine monitor whose disks are vdiskfs nodes.

Not built yet (see the issue "The emulator"); ``vdiskfs boot`` reports that.
"""
