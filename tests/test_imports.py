"""The import graph: no module-level cycle among vdiskfs/ and emulator/ modules, none hidden by
an import inside a function, and ``vdiskfs`` commands load only what they run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _graph_script() -> ModuleType:
    # scripts/ is not a package: load the script that prints the same figures by its path.
    path = ROOT / "scripts" / "import_graph.py"
    spec = importlib.util.spec_from_file_location("import_graph", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("function_local", [False, True], ids=["module-level", "function-local"])
def test_no_import_cycle(function_local: bool) -> None:
    script = _graph_script()
    graph = script.import_graph(ROOT, function_local=function_local)
    assert "vdiskfs.block.registry" in graph and "emulator.kvm.pvm" in graph
    assert script.cycles(graph) == []


def test_the_graph_script_finds_a_cycle(tmp_path: Path) -> None:
    # The check above is only worth something if the script sees a cycle when there is one.
    package = tmp_path / "vdiskfs"
    package.mkdir()
    (tmp_path / "emulator").mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from vdiskfs.b import B\nA = 1\n")
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from vdiskfs.c import C\n"
        "def f():\n    from vdiskfs import a\n"
        "B = 2\n")
    (package / "c.py").write_text("from vdiskfs import b\n")
    script = _graph_script()
    assert script.cycles(script.import_graph(tmp_path)) == []
    assert script.cycles(script.import_graph(tmp_path, function_local=True)) == [
        ["vdiskfs.a", "vdiskfs.b"]]


def _loaded_after(code: str) -> list[str]:
    # A fresh interpreter: this one has imported everything already. What ``code`` prints
    # (a --help) comes before the marker.
    probe = (f"{code}\nimport sys\nprint('-- loaded:')\n"
             "print('\\n'.join(m for m in sys.modules "
             "if m.startswith(('emulator', 'vdiskfs.drivers.format'))))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    return result.stdout.rpartition("-- loaded:")[2].split()


def test_importing_the_cli_loads_no_emulator_and_no_format_driver() -> None:
    assert _loaded_after("import vdiskfs.cli") == []


def test_unmount_loads_no_emulator_and_no_format_driver() -> None:
    code = ("import vdiskfs.cli\n"
            "try:\n    vdiskfs.cli.main(['unmount', '--help'])\n"
            "except SystemExit:\n    pass")
    assert _loaded_after(code) == []


def test_boot_loads_the_emulator() -> None:
    # The lazy side of the test above: boot's options still come from the emulator.
    code = ("import vdiskfs.cli\n"
            "try:\n    vdiskfs.cli.main(['boot', '--help'])\n"
            "except SystemExit:\n    pass")
    assert "emulator.cli" in _loaded_after(code)
