"""Run cases in a sandboxed pool, classify what happened, deduplicate, write reproducers.

Each case runs in its own process, forked from a multiprocessing *forkserver* that has already
imported the whole stack (a fresh interpreter costs about 0.7 s here; a fork a few ms), under
the limits :mod:`.target` sets. The parent hashes every file of the case directory before and
after, and kills a child that outlives its watchdog.

Outcomes, from the most to the least serious:

======================  =========================================================================
``modified``            a file of the case changed, appeared or vanished (the inputs are
                        opened read-only)
``outside``             a file outside the case directory (and the interpreter's own) was opened
``crash``               the child died of a signal, or exited without a word
``hang``                the watchdog fired (its stack dump gives the frame), or the child was killed
``memory``              ``MemoryError`` under the address-space limit
``unexpected``          any exception other than the project's own (:mod:`vdiskfs.errors`)
``error``               a clean, one-line :class:`~vdiskfs.errors.VdiskError`: the image is refused
``ok``                  opened and read through
======================  =========================================================================

The first five are *findings*, deduplicated by their :class:`Signature`: (outcome, exception
type, innermost project frame). Each new signature gets a reproducer directory: the case made
again from its seed and name (so before the run touched it), and a README with the commands.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.fuzz import target
from tests.support.fuzz.mutate import CaseSpec, make_case
from tests.support.fuzz.seeds import FORMATS, Seed, build_corpus

__all__ = [
    "FINDINGS",
    "KNOWN_BUGS_BEING_FIXED",
    "OUTCOMES",
    "Campaign",
    "CaseResult",
    "Signature",
    "run_one",
]

OUTCOMES = ("ok", "error", "unexpected", "hang", "memory", "modified", "outside", "crash")
FINDINGS = ("unexpected", "hang", "memory", "modified", "outside", "crash")
#: Every format, then the virtqueue: the order a campaign visits them in.
TARGETS = (*FORMATS, "virtio")

DEFAULT_TIMEOUT = 5.0
DEFAULT_MEMORY = 2 << 30


@dataclass(frozen=True)
class Signature:
    outcome: str
    type: str
    frame: str

    def __str__(self) -> str:
        return f"{self.outcome} {self.type or '-'} at {self.frame or '?'}"

    def slug(self) -> str:
        text = f"{self.outcome}-{self.type}-{self.frame.rsplit('/', 1)[-1]}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:100]


@dataclass(frozen=True)
class KnownBug:
    """A finding someone is fixing: matched on outcome, type and a frame prefix."""

    outcome: str
    type: str
    frame_prefix: str
    why: str

    def matches(self, signature: Signature) -> bool:
        return (signature.outcome == self.outcome and signature.type == self.type
                and signature.frame.startswith(self.frame_prefix))


#: Bugs known and being fixed elsewhere: the test suite tolerates these signatures and the
#: campaign table marks them "known". Empty since issue 10's FIFO hang and VHD locator
#: traceback were fixed; add an entry only together with the issue that tracks it.
KNOWN_BUGS_BEING_FIXED: tuple[KnownBug, ...] = ()


def known_bug(signature: Signature) -> KnownBug | None:
    return next((bug for bug in KNOWN_BUGS_BEING_FIXED if bug.matches(signature)), None)


@dataclass
class CaseResult:
    name: str
    format: str
    outcome: str
    type: str = ""
    frame: str = ""
    message: str = ""
    detail: str = ""
    elapsed: float = 0.0

    @property
    def signature(self) -> Signature:
        return Signature(self.outcome, self.type, self.frame)

    @property
    def is_finding(self) -> bool:
        return self.outcome in FINDINGS


# -- one case --------------------------------------------------------------------------------------

_context_lock = threading.Lock()
_context: Any = None


def _mp_context() -> Any:
    global _context
    with _context_lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["tests.support.fuzz.target", "tests.support.fuzz.virtio"])
            _context = ctx
        return _context


def tree_state(directory: Path) -> dict[str, str]:
    """Every entry of a case tree: a SHA-256 for files, the kind for anything else (a FIFO
    is never opened)."""
    state: dict[str, str] = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = Path(root) / name
            rel = path.relative_to(directory).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode):
                state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(mode):
                state[rel] = "symlink " + os.readlink(path)
            else:
                state[rel] = f"mode {stat.S_IFMT(mode):o}"
    return state


def run_one(case_dir: Path, *, timeout: float = DEFAULT_TIMEOUT,
            memory: int = DEFAULT_MEMORY) -> CaseResult:
    """Run the case in ``case_dir`` in a sandboxed child and classify the outcome."""
    spec = CaseSpec.load(case_dir)
    before = tree_state(case_dir)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fuzz-run-") as scratch:
        result_path, stderr_path = Path(scratch) / "result.jsonl", Path(scratch) / "stderr"
        result_path.touch()
        process = _mp_context().Process(
            target=target.child_main,
            args=(str(case_dir), str(result_path), str(stderr_path), timeout, memory),
            daemon=True,
        )
        process.start()
        process.join(timeout + 5)
        killed = process.is_alive()
        if killed:
            process.kill()
            process.join()
        events = [json.loads(line) for line in result_path.read_text().splitlines() if line]
        stderr = stderr_path.read_text(errors="replace") if stderr_path.exists() else ""
        exitcode = process.exitcode
        process.close()
    elapsed = time.monotonic() - started
    after = tree_state(case_dir)
    result = CaseResult(spec.name, spec.format, "ok", elapsed=elapsed)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    outside = [e for e in events if e.get("event") == "outside"]
    done = next((e for e in events if e.get("event") == "done"), None)
    if changed:
        result.outcome, result.frame = "modified", changed[0]
        result.message = f"changed: {', '.join(changed[:5])}"
    elif outside:
        first = outside[0]
        result.outcome, result.frame = "outside", first.get("frame", "")
        result.type = "write" if first.get("writing") else "read"
        result.message = f"opened {first['path']} (real {first['real']})"
        result.detail = first.get("stack", "")
    elif done is not None:
        result.outcome = done["outcome"]
        result.type = done.get("type", "")
        result.frame = done.get("frame", "")
        result.message = done.get("message", "")
        result.detail = done.get("traceback", "")
    elif "Timeout (" in stderr or killed:
        main = next((e.get("main_thread") for e in events if e.get("event") == "start"), None)
        result.outcome = "hang"
        result.frame = _hang_frame(stderr, main)
        result.message = f"no answer after {timeout:g} s"
        result.detail = stderr[-4000:]
    else:
        result.outcome, result.type = "crash", f"exit {exitcode}"
        result.message = stderr.strip().splitlines()[-1][:300] if stderr.strip() else ""
        result.detail = stderr[-4000:]
        result.frame = _hang_frame(stderr, None)
    return result


def _hang_frame(dump: str, main_thread: int | None) -> str:
    """The innermost project frame of the main thread in a faulthandler dump."""
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", dump)
    wanted = f"0x{main_thread:016x}" if main_thread else None
    chosen = [b for b in blocks if wanted and wanted in b.split("\n", 1)[0]] or blocks
    for block in chosen:
        # faulthandler lists the most recent call first.
        for m in re.finditer(r'File "([^"]+)", line (\d+) in (\S+)', block):
            where = target.project_path(m.group(1))
            if where:
                return f"{where}:{m.group(3)}"
    return ""


# -- a campaign ------------------------------------------------------------------------------------


@dataclass
class Finding:
    signature: Signature
    first: CaseResult
    count: int = 0
    cases: list[str] = field(default_factory=list)
    reproducer: Path | None = None


@dataclass
class Campaign:
    """Cases made from ``seeds`` (built under ``out/seeds``), run ``workers`` at a time.

    ``case_names`` yields ``(target, name)``; a name makes the same case every time.
    """

    out: Path
    workers: int = 2
    timeout: float = DEFAULT_TIMEOUT
    memory: int = DEFAULT_MEMORY
    #: Keep every case directory (a fixed set in a test), not only those of findings.
    keep_cases: bool = False
    counts: dict[str, Counter[str]] = field(default_factory=dict)
    findings: dict[Signature, Finding] = field(default_factory=dict)
    results: list[CaseResult] = field(default_factory=list)
    corpus: dict[str, list[Seed]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.corpus = build_corpus(self.out / "seeds")
        (self.out / "cases").mkdir(exist_ok=True)

    def make(self, fmt: str, name: str, directory: Path) -> CaseSpec:
        if fmt == "virtio":
            from tests.support.fuzz.virtio import make_virtio_case

            return make_virtio_case(directory, name)
        seeds = self.corpus[fmt]
        seed = seeds[int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(seeds)]
        return make_case(seed, directory, name)

    def run_case(self, fmt: str, name: str) -> CaseResult:
        directory = self.out / "cases" / name
        if directory.exists():
            shutil.rmtree(directory)
        self.make(fmt, name, directory)
        result = run_one(directory, timeout=self.timeout, memory=self.memory)
        with self._lock:
            self.results.append(result)
            self.counts.setdefault(fmt, Counter())[result.outcome] += 1
            new = None
            if result.is_finding:
                finding = self.findings.get(result.signature)
                if finding is None:
                    finding = new = self.findings[result.signature] = Finding(result.signature,
                                                                              result)
                finding.count += 1
                finding.cases.append(name)
        if new is not None:
            self._write_reproducer(fmt, new)
        if not self.keep_cases:
            shutil.rmtree(directory, ignore_errors=True)
        return result

    def run(self, names: Iterator[tuple[str, str]],
            stop: Callable[[], bool] = lambda: False) -> None:
        """Run ``names`` through the pool until they run out or ``stop()`` says so."""
        with ThreadPoolExecutor(self.workers) as pool:
            pending: set[Any] = set()
            for fmt, name in names:
                if stop():
                    break
                while len(pending) >= 2 * self.workers:
                    finished = {f for f in pending if f.done()}
                    if not finished:
                        time.sleep(0.01)
                        continue
                    for f in finished:
                        f.result()
                    pending -= finished
                pending.add(pool.submit(self.run_case, fmt, name))
            for f in pending:
                f.result()

    def _write_reproducer(self, fmt: str, finding: Finding) -> None:
        directory = self.out / "findings" / finding.signature.slug()
        if directory.exists():
            shutil.rmtree(directory)
        case = directory / "case"
        spec = self.make(fmt, finding.first.name, case)
        finding.reproducer = directory
        result = finding.first
        lines = [
            f"# {finding.signature}",
            "",
            f"Case `{result.name}` ({fmt}, seed `{spec.seed}`): {result.message}",
            "",
            "Mutations:",
            *[f"- {m}" for m in spec.mutations or [json.dumps(spec.params)]],
            "",
            "Reproduce (the sandboxed child, as the campaign ran it):",
            "",
            f"    cd {target.REPO} && PYTHONPATH=. .venv/bin/python -m tests.support.fuzz "
            f"replay {case}",
        ]
        if spec.kind == "image":
            flag = "" if spec.follow_outside else " --no-follow-outside"
            lines += ["", "or, as a user would:", "",
                      f"    cd {target.REPO} && PYTHONPATH=. .venv/bin/python -m vdiskfs info"
                      f"{flag} {case / spec.image}"]
        if known_bug(finding.signature):
            lines += ["", f"Known: {known_bug(finding.signature).why}"]  # type: ignore[union-attr]
        if result.detail:
            lines += ["", "Detail:", "", *["    " + x for x in result.detail.splitlines()]]
        (directory / "README.md").write_text("\n".join(lines) + "\n")

    # -- reporting ---------------------------------------------------------------------------

    def table(self) -> str:
        """Format x outcome counts, then the deduplicated findings."""
        rows = [("target", *OUTCOMES, "total")]
        total: Counter[str] = Counter()
        for fmt in TARGETS:
            counts = self.counts.get(fmt)
            if not counts:
                continue
            total.update(counts)
            rows.append((fmt, *[str(counts[o]) for o in OUTCOMES], str(sum(counts.values()))))
        rows.append(("all", *[str(total[o]) for o in OUTCOMES], str(sum(total.values()))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                           enumerate(zip(r, widths, strict=True))) for r in rows]
        lines.append("")
        if not self.findings:
            lines.append("findings: none")
        else:
            lines.append(f"findings ({len(self.findings)} distinct):")
            for finding in sorted(self.findings.values(), key=lambda f: -f.count):
                bug = known_bug(finding.signature)
                mark = f"  [known: {bug.why}]" if bug else ""
                lines.append(f"  {finding.count:>5} x {finding.signature}{mark}")
                lines.append(f"        {finding.first.message[:160]}")
                if finding.reproducer is not None:
                    lines.append(f"        reproducer: {finding.reproducer}")
        return "\n".join(lines)

    def unknown_findings(self) -> list[Finding]:
        return [f for f in self.findings.values() if known_bug(f.signature) is None]


def round_robin(prefix: str, targets: tuple[str, ...] = TARGETS,
                count: int | None = None) -> Iterator[tuple[str, str]]:
    """``(target, name)`` for every target in turn: ``{prefix}-{target}-{i}``."""
    i = 0
    while count is None or i < count:
        for fmt in targets:
            yield fmt, f"{prefix}-{fmt}-{i}"
        i += 1
