"""Finding what a disk boots (``vdiskfs boot`` without ``--kernel``), on real GPT disks whose
ext4 partitions ``mkfs.ext4 -d`` filled with /boot files: grub.cfg variants, the newest-kernel
fallback, and the bad inputs. No guest is started (the one boot is in test_cloudboot.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from emulator.arch.x86_64 import layout
from emulator.guestboot import BootChoice, find_boot
from emulator.guestboot.find import version_key, with_serial_console
from emulator.loader import load_kernel_image
from emulator.memory import GuestMemory
from tests.support.images import qemu_img, random_bytes
from tests.support.partitioned import FsSpec, MiB, make_linux_disk
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.errors import FormatError, UnsupportedError, VdiskError

REPO = Path(__file__).resolve().parents[3]
ROOT_UUID = "3e7b6a2c-1111-4222-8333-944455556666"
BOOT_UUID = "0b00b00b-2222-4333-8444-955566667777"
NEW, OLD = "6.1.0-13-cloud-amd64", "6.1.0-9-cloud-amd64"
ACPI_CONFIG = b"CONFIG_ACPI=y\nCONFIG_VIRTIO_MMIO=m\nCONFIG_VIRTIO_BLK=m\n"

#: What Debian 12's grub-mkconfig writes for a cloud image (trimmed: theme, fonts, os-prober),
#: with @ROOT@ (the root's UUID), @NEW@, @OLD@ (kernel versions) and @DEFAULT@ to fill in.
DEBIAN_GRUB_CFG = (Path(__file__).parent / "debian12-grub.cfg").read_text()


def debian_cfg(default: str = "0") -> bytes:
    text = (DEBIAN_GRUB_CFG.replace("@DEFAULT@", default).replace("@ROOT@", ROOT_UUID)
            .replace("@NEW@", NEW).replace("@OLD@", OLD))
    return text.encode()


def boot_files(prefix: str = "boot/") -> dict[str, bytes]:
    """Two kernels, the newer one's initrd and config, under ``prefix``."""
    return {
        f"{prefix}vmlinuz-{NEW}": b"kernel new",
        f"{prefix}vmlinuz-{OLD}": b"kernel old",
        f"{prefix}initrd.img-{NEW}": b"initrd new",
        f"{prefix}config-{NEW}": ACPI_CONFIG,
    }


def root_fs(files: dict[str, bytes] | None = None, **extra: object) -> FsSpec:
    return FsSpec(files={"etc/fstab": b"# root\n", **boot_files(), **(files or {})},
                  uuid=ROOT_UUID, **extra)  # type: ignore[arg-type]


async def find(path: Path) -> BootChoice:
    node = await open_image(str(path), OpenOptions(read_only=True))
    try:
        return await find_boot(node, path.name, initrd_limit=64 << 20)
    finally:
        await node.aclose()


@pytest.mark.parametrize(("options", "features"), [
    ((), {"extent", "64bit", "metadata_csum", "has_journal"}),  # Debian's mke2fs, 1 KiB blocks
    (("-b", "4096"), {"extent", "64bit", "metadata_csum"}),
    (("-t", "ext2"), {"filetype"}),  # block maps, no extents
], ids=["ext4-1k", "ext4-4k", "ext2"])
async def test_kernel_read_from_ext_variants(tmp_path: Path, options: tuple[str, ...],
                                              features: set[str]) -> None:
    # 3 MiB: with 1 KiB blocks, past ext2's direct and single-indirect blocks (12 KiB +
    # 256 KiB) into double-indirect ones.
    kernel = random_bytes(3, 3 << 20)
    disk = make_linux_disk(tmp_path / "disk.raw", [FsSpec(
        files={f"boot/vmlinuz-{NEW}": kernel, "etc/fstab": b""}, uuid=ROOT_UUID,
        options=options)])
    part = tmp_path / "p1"
    with open(disk, "rb") as f:
        f.seek(1 << 20)
        part.write_bytes(f.read(8 << 20))
    text = subprocess.run(["dumpe2fs", "-h", str(part)], capture_output=True, text=True,
                          check=True).stdout
    listed = re.search(r"^Filesystem features:\s+(.*)$", text, re.M)
    assert listed is not None and features <= set(listed.group(1).split()), text
    choice = await find(disk)
    assert choice.kernel == kernel
    assert choice.cmdline == "root=/dev/vda1 ro console=ttyS0"


async def test_debian_grub_cfg_default_entry_through_qcow2(tmp_path: Path) -> None:
    raw = make_linux_disk(tmp_path / "disk.raw",
                          [root_fs({"boot/grub/grub.cfg": debian_cfg()})])
    image = tmp_path / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    choice = await find(image)
    assert choice.kernel == b"kernel new" and choice.initrd == b"initrd new"
    assert choice.kernel_name == f"disk.qcow2 partition 1: /boot/vmlinuz-{NEW}"
    assert choice.initrd_names == (f"disk.qcow2 partition 1: /boot/initrd.img-{NEW}",)
    # The entry's own console=ttyS0,115200 is kept, nothing added.
    assert choice.cmdline == ("root=PARTUUID=b7a2 ro console=tty0 console=ttyS0,115200 "
                              "earlyprintk=ttyS0,115200 consoleblank=0")
    assert choice.reason == ("grub.cfg default entry 'Debian GNU/Linux' "
                             "(disk.qcow2 partition 1: /boot/grub/grub.cfg)")
    assert choice.warnings == []
    assert choice.stats()["kernel"] == choice.kernel_name


@pytest.mark.parametrize(("default", "kernel", "cmdline"), [
    ("1>1", OLD, "root=PARTUUID=b7a2 ro single console=ttyS0"),
    (f"gnulinux-advanced-{ROOT_UUID}>gnulinux-{OLD}-advanced-{ROOT_UUID}", OLD,
     "root=PARTUUID=b7a2 ro single console=ttyS0"),
    (f"Advanced options for Debian GNU/Linux>Debian GNU/Linux, with Linux {OLD}", OLD,
     "root=PARTUUID=b7a2 ro single console=ttyS0"),
    # A submenu named alone: its first entry.
    ("1", NEW, "root=PARTUUID=b7a2 ro console=ttyS0"),
    # A default that names nothing: GRUB boots the first entry.
    ("7", NEW, "root=PARTUUID=b7a2 ro console=tty0 console=ttyS0,115200 "
     "earlyprintk=ttyS0,115200 consoleblank=0"),
], ids=["index-path", "id-path", "title-path", "submenu", "missing"])
async def test_grub_default_forms(tmp_path: Path, default: str, kernel: str,
                                  cmdline: str) -> None:
    disk = make_linux_disk(tmp_path / "disk.raw",
                           [root_fs({"boot/grub/grub.cfg": debian_cfg(default)})])
    choice = await find(disk)
    assert choice.kernel_name.endswith(f"/boot/vmlinuz-{kernel}")
    assert choice.cmdline == cmdline


async def test_grubenv_next_entry(tmp_path: Path) -> None:
    env = (b"# GRUB Environment Block\nnext_entry=1>1\n").ljust(1024, b"#")
    disk = make_linux_disk(tmp_path / "disk.raw", [root_fs({
        "boot/grub/grub.cfg": debian_cfg(), "boot/grub/grubenv": env})])
    choice = await find(disk)
    assert choice.kernel_name.endswith(f"/boot/vmlinuz-{OLD}")
    assert choice.initrd is None


async def test_separate_boot_partition_found_by_search(tmp_path: Path) -> None:
    # Partition 1 is the root, partition 2 /boot: its grub.cfg names files on itself, and
    # one on the root by device.
    cfg = (f"set default=boot2\n"
           f"menuentry first {{ linux /nothing-here }}\n"
           f"menuentry \"Second one\" --id boot2 {{\n"
           f"  search --no-floppy --fs-uuid --set=root {BOOT_UUID}\n"
           f"  linux /vmlinuz-{NEW} root=UUID={ROOT_UUID} ro quiet\n"
           f"  initrd (hd0,gpt1)/usr/lib/ucode.img ($root)/initrd.img-{NEW}\n"
           f"}}\n").encode()
    disk = make_linux_disk(tmp_path / "disk.raw", [
        FsSpec(files={"etc/fstab": b"", "usr/lib/ucode.img": b"ucode "}, uuid=ROOT_UUID),
        FsSpec(files={"grub/grub.cfg": cfg, **boot_files("")}, uuid=BOOT_UUID),
    ])
    choice = await find(disk)
    assert choice.kernel_name == f"disk.raw partition 2: /vmlinuz-{NEW}"
    # Several initrds: one concatenated cpio, in order.
    assert choice.initrd == b"ucode initrd new"
    assert choice.cmdline == f"root=UUID={ROOT_UUID} ro quiet console=ttyS0"


UBUNTU_ENTRY = f"""
set linux_gfx_mode=
if [ "${{linux_gfx_mode}}" != "text" ]; then set vt_handoff=vt.handoff=7; else set vt_handoff=; fi
menuentry 'Ubuntu' --class ubuntu $menuentry_id_option 'gnulinux-simple-x' {{
    recordfail
    gfxmode $linux_gfx_mode
    search --no-floppy --label --set=root part1
    if [ "${{initrdfail}}" = 1 ]; then
      linux    /boot/vmlinuz-{OLD} root=LABEL=part1 ro console=tty1 panic=-1
      initrd    /boot/initrd.img-{NEW}
    else
      linuxefi    /boot/vmlinuz-{NEW} root=LABEL=part1 ro console=tty1 console=ttyS0 $vt_handoff
      if [ "${{initrdfail}}" = 1 ]; then initrdefi /nothing; fi
    fi
}}
""".encode()


async def test_ubuntu_style_entry_takes_the_branch_that_holds(tmp_path: Path) -> None:
    # if/else inside the entry, a variable set by an earlier if, search by label, linuxefi.
    disk = make_linux_disk(tmp_path / "disk.raw", [root_fs({"boot/grub/grub.cfg":
                                                            UBUNTU_ENTRY})])
    choice = await find(disk)
    assert choice.kernel_name.endswith(f"/boot/vmlinuz-{NEW}") and choice.initrd is None
    assert choice.cmdline == "root=LABEL=part1 ro console=tty1 console=ttyS0 vt.handoff=7"


async def test_configfile_is_followed(tmp_path: Path) -> None:
    disk = make_linux_disk(tmp_path / "disk.raw", [root_fs({
        "boot/grub/grub.cfg": b"insmod ext2\nconfigfile ($root)/boot/grub/real.cfg\n"
                              b"menuentry never { linux /never }\n",
        "boot/grub/real.cfg": f"menuentry 'Real' {{ linux /boot/vmlinuz-{OLD} root=/dev/vda1"
                              f" }}\n".encode()})])
    choice = await find(disk)
    assert choice.kernel_name.endswith(f"/boot/vmlinuz-{OLD}")
    assert choice.reason \
        == "grub.cfg default entry 'Real' (disk.raw partition 1: /boot/grub/real.cfg)"


async def test_newest_kernel_without_grub_cfg(tmp_path: Path) -> None:
    disk = make_linux_disk(tmp_path / "disk.raw", [FsSpec(kind="empty"), root_fs()])
    choice = await find(disk)
    assert choice.kernel == b"kernel new" and choice.initrd == b"initrd new"
    assert choice.kernel_name == f"disk.raw partition 2: /boot/vmlinuz-{NEW}"
    # With an initramfs the root is named by its file system's UUID.
    assert choice.cmdline == f"root=UUID={ROOT_UUID} ro console=ttyS0"
    assert choice.reason == "the newest kernel (no grub.cfg)"


async def test_newest_kernel_without_initrd_names_the_device(tmp_path: Path) -> None:
    # The kernel alone cannot read UUIDs; /vmlinuz-style links are followed like files.
    files = {f"boot/vmlinuz-{OLD}": b"old", "boot/vmlinuz-5.10.0-1-amd64": b"older",
             f"boot/vmlinuz-{NEW}.dpkg-bak": b"a backup"}
    spec = FsSpec(files=files, links={f"boot/vmlinuz-{NEW}": f"vmlinuz-{OLD}",
                                      "vmlinuz": f"boot/vmlinuz-{NEW}"}, uuid=ROOT_UUID)
    disk = make_linux_disk(tmp_path / "disk.raw", [spec])
    choice = await find(disk)
    assert choice.kernel_name == f"disk.raw partition 1: /boot/vmlinuz-{NEW}"
    assert choice.kernel == b"old" and choice.initrd is None
    assert choice.cmdline == "root=/dev/vda1 ro console=ttyS0"


async def test_whole_disk_file_system_and_separate_boot_fallback(tmp_path: Path) -> None:
    whole = make_linux_disk(tmp_path / "whole.raw", [FsSpec(files=boot_files())], table=False)
    choice = await find(whole)
    assert choice.kernel_name == f"whole.raw: /boot/vmlinuz-{NEW}"
    assert choice.cmdline.startswith("root=UUID=")
    split = make_linux_disk(tmp_path / "split.raw", [
        FsSpec(files=boot_files(""), uuid=BOOT_UUID),
        FsSpec(files={"etc/hostname": b"vm\n"}, uuid=ROOT_UUID)])
    choice = await find(split)
    assert choice.kernel_name == f"split.raw partition 1: /vmlinuz-{NEW}"
    assert choice.cmdline == f"root=UUID={ROOT_UUID} ro console=ttyS0"


@pytest.mark.parametrize(("config", "warning"), [
    (b"CONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_BLK=y\n# CONFIG_ACPI is not set\n",
     "without CONFIG_ACPI and without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"),
    (b"CONFIG_ACPI=y\n# CONFIG_VIRTIO_MMIO is not set\nCONFIG_VIRTIO_BLK=m\n",
     "without CONFIG_VIRTIO_MMIO or CONFIG_VIRTIO_BLK"),
])
async def test_kernel_that_cannot_find_its_disks_is_warned(tmp_path: Path, config: bytes,
                                                          warning: str) -> None:
    disk = make_linux_disk(tmp_path / "disk.raw", [root_fs({f"boot/config-{NEW}": config})])
    choice = await find(disk)
    assert len(choice.warnings) == 1
    assert choice.warnings[0].startswith(f"disk.raw partition 1: /boot/vmlinuz-{NEW}: built")
    assert warning in choice.warnings[0]


LOOP_A = b"configfile /boot/grub/b.cfg\n"
LOOP_B = b"source /boot/grub/grub.cfg\n"


@pytest.mark.parametrize(("files", "error", "message"), [
    ({"etc/fstab": b""}, FormatError,
     r"disk.raw: no kernel to boot found in disk.raw partition 1 \(no /boot/grub/grub.cfg"),
    ({"boot/grub/grub.cfg": b"menuentry x {\n linux /boot/vmlinuz-9 ro\n}\n"}, FormatError,
     r"grub.cfg: menu entry 'x': line 2: kernel /boot/vmlinuz-9 is not a file on "
     r"disk.raw partition 1"),
    ({"boot/grub/grub.cfg": b"menuentry x {\n search --fs-uuid --set=root 1234-5678\n"
                            b" linux /vmlinuz\n}\n"}, FormatError,
     r"kernel /vmlinuz is not a file on disk.raw partition 1 \(search --fs-uuid 1234-5678 "
     r"found no such file system on the disk\)"),
    ({"boot/grub/grub.cfg": b"menuentry x { linux (hd1,gpt1)/vmlinuz }\n"}, FormatError,
     r"device \(hd1,gpt1\): only the booted disk \(hd0\) is read"),
    ({"boot/grub/grub.cfg": b"menuentry x { linux (hd0,gpt7)/vmlinuz }\n"}, FormatError,
     r"kernel /vmlinuz is not a file on disk.raw partition 7"),
    ({"boot/grub/grub.cfg": b"menuentry x { echo hi }\n"}, FormatError,
     r"menu entry 'x': no linux command: nothing to boot"),
    ({"boot/grub/grub.cfg": b"set timeout=5\n"}, FormatError,
     r"disk.raw partition 1: /boot/grub/grub.cfg: no menuentry"),
    ({"boot/grub/grub.cfg": b"menuentry 'x' {\n linux /boot/vmlinuz\n"}, FormatError,
     r"grub.cfg: line 1: block never closed"),
    ({"boot/grub/grub.cfg": b"menuentry 'x {\n"}, FormatError, r"unterminated ' quote"),
    ({"boot/grub/grub.cfg": b"if true; then\n" * 5000}, FormatError,
     r"grub.cfg: line 32: blocks nested more than 32 deep"),
    ({"boot/grub/grub.cfg": b"menuentry x { " * 5000}, FormatError,
     r"grub.cfg: line 1: blocks nested more than 32 deep"),
    ({"boot/grub/grub.cfg": LOOP_A, "boot/grub/b.cfg": LOOP_B}, FormatError,
     r"configuration loops: disk.raw partition 1: /boot/grub/grub.cfg -> disk.raw partition "
     r"1: /boot/grub/b.cfg -> disk.raw partition 1: /boot/grub/grub.cfg"),
], ids=["no-kernel", "missing-kernel", "search-finds-nothing", "other-disk", "no-partition",
        "no-linux", "no-entries", "unclosed", "unterminated-quote", "nested-if", "nested-braces",
        "configfile-loop"])
async def test_bad_images_say_what_is_wrong(tmp_path: Path, files: dict[str, bytes],
                                            error: type[VdiskError], message: str) -> None:
    disk = make_linux_disk(tmp_path / "disk.raw", [FsSpec(files=files)])
    with pytest.raises(error, match=message):
        await find(disk)


async def test_symlink_loop_is_an_error(tmp_path: Path) -> None:
    spec = FsSpec(files={"boot/grub/grub.cfg": b"menuentry x { linux /boot/a }\n"},
                  links={"boot/a": "b", "boot/b": "a"})
    disk = make_linux_disk(tmp_path / "disk.raw", [spec])
    with pytest.raises(FormatError, match="too many levels of symbolic links"):
        await find(disk)


async def test_unsupported_file_system_is_named(tmp_path: Path) -> None:
    disk = make_linux_disk(tmp_path / "disk.raw", [
        FsSpec(kind="vfat", files={"EFI/debian/grub.cfg": b"configfile x\n"}),
        FsSpec(kind="empty")])
    with pytest.raises(UnsupportedError, match=(
            r"disk.raw: no kernel to boot found; disk.raw partition 1: vfat: not read \(only "
            r"ext2/3/4 is\); disk.raw partition 2: no file system recognised; boot it with "
            r"--kernel")):
        await find(disk)


async def test_damaged_ext4_is_a_format_error(tmp_path: Path) -> None:
    disk = make_linux_disk(tmp_path / "disk.raw", [root_fs({"boot/grub/grub.cfg":
                                                            debian_cfg()})])
    # The group descriptors (block 2 of this 1 KiB-block file system, after the superblock)
    # point past the end: the root directory's inode cannot be found.
    with open(disk, "r+b") as f:
        f.seek((1 << 20) + 2048)
        f.write(b"\xff" * 1024)
    with pytest.raises(FormatError, match=r"disk.raw partition 1: /boot/grub/grub.cfg: damaged "
                                          r"ext2/3/4 file system: "):
        await find(disk)


def test_cli_says_why_in_one_line(tmp_path: Path) -> None:
    # Before any KVM is opened: no /dev/kvm needed.
    disk = make_linux_disk(tmp_path / "disk.raw", [FsSpec(files={"etc/fstab": b""})])
    proc = subprocess.run([sys.executable, "-m", "emulator", "--disk", f"{disk},format=raw"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"vdiskfs boot: error: {disk}: no kernel to boot found"), \
        proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = subprocess.run([sys.executable, "-m", "emulator", "--initrd", "x"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (2, "vdiskfs boot: error: --initrd needs --kernel\n")
    proc = subprocess.run([sys.executable, "-m", "emulator"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (
        2, "vdiskfs boot: error: --kernel, or a --disk to boot the kernel of\n")


@pytest.fixture(scope="module")
def stock_kernel() -> Path:
    """Debian's linux-image-cloud-amd64 vmlinuz, its config beside it
    (scripts/guest/fetch-cloud-kernel.sh: apt-get download, cached)."""
    proc = subprocess.run([str(REPO / "scripts/guest/fetch-cloud-kernel.sh")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"fetch-cloud-kernel.sh: {proc.stderr.strip()[-300:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
async def test_stock_debian_kernel_is_found_and_loads(stock_kernel: Path, tmp_path: Path) -> None:
    # The files as Debian installs them: /boot/vmlinuz-<version> (LZ4 bzImage) and
    # /boot/config-<version> (ACPI=y, virtio as modules: no warning), found by grub.cfg.
    version = "6.1.0-99-cloud-amd64"
    config = (stock_kernel.parent / "config").read_bytes()
    disk = make_linux_disk(tmp_path / "disk.raw", [root_fs({
        f"boot/vmlinuz-{version}": stock_kernel.read_bytes(),
        f"boot/config-{version}": config,
        f"boot/initrd.img-{version}": b"07070100000000",
        "boot/grub/grub.cfg": debian_cfg().replace(NEW.encode(), version.encode()),
    }, size=48 * MiB)])
    choice = await find(disk)
    assert choice.kernel == stock_kernel.read_bytes() and choice.warnings == []
    memory = GuestMemory.anonymous(layout.ram_regions(256 << 20))
    try:
        kernel = load_kernel_image(memory, choice.kernel, choice.kernel_name)
    finally:
        memory.close()
    assert kernel.kind == "bzImage/lz4"
    # The same kernel built without ACPI could not find the VMM's disks: said before booting.
    assert b"CONFIG_ACPI=y\n" in config
    no_acpi = make_linux_disk(tmp_path / "no-acpi.raw", [root_fs({
        f"boot/config-{NEW}": config.replace(b"CONFIG_ACPI=y\n", b"")})])
    (warning,) = (await find(no_acpi)).warnings
    assert "without CONFIG_ACPI and without CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES" in warning


def test_version_order_and_serial_console() -> None:
    versions = ["6.1.0-9-amd64", "6.1.0-13-amd64", "5.10.0-28-amd64", "6.1.0-13-amd64+b1"]
    assert max(versions, key=version_key) == "6.1.0-13-amd64+b1"
    assert sorted(versions, key=version_key)[0] == "5.10.0-28-amd64"
    assert with_serial_console("ro quiet") == "ro quiet console=ttyS0"
    assert with_serial_console("console=ttyS0,115200n8 ro") == "console=ttyS0,115200n8 ro"
    assert with_serial_console("console=ttyS1") == "console=ttyS1 console=ttyS0"
