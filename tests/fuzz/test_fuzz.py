"""The fuzzing harness in the test suite: a fixed-seed set of hostile cases, and the harness's
own checks (each outcome classified as it should be, the virtqueue guard catching a rogue device).

The cases are named ``suite-<target>-<i>``: the same names make the same cases on every run
(see :mod:`tests.support.fuzz.mutate`). A finding fails the test with the reproducer's path,
unless its signature is one of
:data:`~tests.support.fuzz.runner.KNOWN_BUGS_BEING_FIXED` (bugs of issue 10 fixed on other
branches; empty that tuple once they are merged).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio

from emulator.devices.virtio.queue import SplitQueue
from emulator.memory import GuestMemory
from tests.support.fuzz.mutate import CaseSpec
from tests.support.fuzz.runner import (
    FINDINGS,
    KNOWN_BUGS_BEING_FIXED,
    TARGETS,
    Campaign,
    known_bug,
    round_robin,
    run_one,
)
from tests.support.fuzz.virtio import GuardError, run_virtio_case

#: Cases per target in the default run (8 targets: about 300 cases, ~15 s on two cores) and
#: in the ``slow`` one (1200 cases, ~110 s; it was 400 per target, 110-290 s, a tenth of the
#: whole suite: the suite must stay within about 20 minutes, and the fixed seeds find nothing
#: new past the first few hundred -- wider searches are ``scripts/fuzz.sh``'s job).
FAST_PER_TARGET = 38
SLOW_PER_TARGET = 150


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Campaign]:
    yield Campaign(tmp_path_factory.mktemp("fuzz"), workers=2)


def _assert_no_new_findings(run: Campaign) -> None:
    unknown = run.unknown_findings()
    assert not unknown, "fuzzing found:\n" + run.table()


def test_fixed_seed_cases(campaign: Campaign) -> None:
    campaign.run(round_robin("suite", count=FAST_PER_TARGET))
    assert sum(sum(c.values()) for c in campaign.counts.values()) == FAST_PER_TARGET * len(
        TARGETS)
    _assert_no_new_findings(campaign)
    # Not vacuous: every image format is both read through and refused, and no target hung
    # on every case.
    for fmt in TARGETS:
        counts = campaign.counts[fmt]
        assert counts["ok"] > 0, (fmt, counts)
        if fmt not in ("raw", "virtio"):  # a damaged partition table is never an error
            assert counts["error"] > 0, (fmt, counts)


@pytest.mark.slow
def test_fixed_seed_cases_large(tmp_path: Path) -> None:
    run = Campaign(tmp_path, workers=2)
    run.run(round_robin("suite-large", count=SLOW_PER_TARGET))
    _assert_no_new_findings(run)


def test_known_bugs_name_real_frames() -> None:
    repo = Path(__file__).resolve().parents[2]
    for bug in KNOWN_BUGS_BEING_FIXED:
        assert bug.outcome in FINDINGS
        assert (repo / bug.frame_prefix.split(":")[0]).exists(), bug


# -- the harness classifies each outcome ----------------------------------------------------------


def _selftest(tmp_path: Path, what: str) -> CaseSpec:
    directory = tmp_path / what
    directory.mkdir()
    (directory / "victim").write_bytes(b"untouched")
    spec = CaseSpec("selftest", "selftest", f"selftest-{what}", "selftest",
                    params={"do": what})
    spec.save(directory)
    return spec


@pytest.mark.parametrize(("what", "outcome", "type_"), [
    ("nothing", "ok", ""),
    ("refuse", "error", "VdiskError"),
    ("raise", "unexpected", "KeyError"),
    ("memory", "memory", "MemoryError"),
    ("modify", "modified", ""),
    ("outside", "outside", "read"),
    ("crash", "crash", "exit -9"),
    ("hang", "hang", ""),
])
def test_outcomes_are_classified(tmp_path: Path, what: str, outcome: str, type_: str) -> None:
    _selftest(tmp_path, what)
    result = run_one(tmp_path / what, timeout=1.0)
    assert (result.outcome, result.type) == (outcome, type_), result
    if outcome == "unexpected":
        assert result.frame == "", result  # raised in the harness, not in project code
        assert "KeyError" in result.detail
    if outcome == "hang":
        assert "Timeout" in result.detail


def test_fifo_backing_file_is_the_known_hang(tmp_path: Path) -> None:
    """Issue 10's recipe: a qcow2 whose backing file is a FIFO beside it."""
    import os
    import struct

    from tests.support.images import create

    directory = tmp_path / "case"
    directory.mkdir()
    image = create(directory / "top.qcow2", 1 << 20)
    with open(image, "r+b") as f:
        f.seek(0x400)
        f.write(b"fifo")
        f.seek(8)
        f.write(struct.pack(">QI", 0x400, 4))
    os.mkfifo(directory / "fifo")
    CaseSpec("image", "qcow2", "fifo-recipe", "recipe", "top.qcow2").save(directory)
    result = run_one(directory, timeout=1.0)
    if result.outcome == "hang":
        assert known_bug(result.signature) is not None, result
    else:  # fixed: a clean refusal naming the FIFO
        assert result.outcome == "error", result


# -- the virtqueue guard catches a rogue device ---------------------------------------------------


def _rogue(monkeypatch: pytest.MonkeyPatch, *, write: bool) -> None:
    original = SplitQueue.add_used_batch

    def add_used_batch(self: SplitQueue, memory: GuestMemory,
                       elements: Sequence[tuple[int, int]]) -> int:
        if write:
            memory.view(0x10, 1)[0] = 0xAB  # below the rings: no descriptor names it
        else:
            bytes(memory.view(0x20, 8))
        return original(self, memory, elements)

    monkeypatch.setattr(SplitQueue, "add_used_batch", add_used_batch)


@pytest.mark.parametrize("write", [True, False])
def test_guard_catches_access_outside_the_buffers(monkeypatch: pytest.MonkeyPatch,
                                                   write: bool) -> None:
    logging.getLogger("emulator").setLevel(logging.ERROR)
    _rogue(monkeypatch, write=write)
    with pytest.raises(BaseException) as info:  # a GuardError, inside exception groups
        trio.run(run_virtio_case, {"seed": 7})
    leaf = info.value
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, GuardError), info.value
    assert ("changed" if write else "viewed") in str(leaf)


def test_virtio_cases_pass_unharmed() -> None:
    logging.getLogger("emulator").setLevel(logging.ERROR)
    for seed in range(40):
        trio.run(run_virtio_case, {"seed": seed})
