"""``python -m tests.support.fuzz campaign MINUTES [OUTDIR]`` | ``replay CASE_DIR``."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tests.support.fuzz.runner import TARGETS, Campaign, round_robin, run_one


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.fuzz")
    commands = parser.add_subparsers(dest="command", required=True)
    campaign = commands.add_parser("campaign", help="mutate and run cases for MINUTES")
    campaign.add_argument("minutes", type=float)
    campaign.add_argument("out", nargs="?", type=Path)
    campaign.add_argument("--workers", type=int, default=2)
    campaign.add_argument("--timeout", type=float, default=5.0, help="seconds per case")
    campaign.add_argument("--targets", default=",".join(TARGETS),
                          help="comma-separated formats (and 'virtio') to visit")
    campaign.add_argument("--prefix", default=None,
                          help="case name prefix (default: the start time): the same "
                          "prefix makes the same cases")
    replay = commands.add_parser("replay", help="run one case directory again")
    replay.add_argument("case", type=Path)
    replay.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)

    if args.command == "replay":
        result = run_one(args.case.resolve(), timeout=args.timeout)
        print(f"{result.outcome} {result.type} {result.frame}\n{result.message}")
        if result.detail:
            print(result.detail)
        return 0 if not result.is_finding else 1

    out = args.out or Path(tempfile.mkdtemp(prefix="vdiskfs-fuzz-"))
    prefix = args.prefix or time.strftime("%Y%m%d-%H%M%S")
    targets = tuple(t for t in args.targets.split(",") if t)
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; known: {', '.join(TARGETS)}")
    started = time.monotonic()
    deadline = started + args.minutes * 60
    print(f"fuzz: building the seed corpus under {out / 'seeds'}", file=sys.stderr)
    run = Campaign(out.resolve(), workers=args.workers, timeout=args.timeout)
    until = time.strftime("%H:%M:%S", time.localtime(time.time() + args.minutes * 60))
    print(f"fuzz: running until {until} ({args.workers} workers), cases named {prefix}-*",
          file=sys.stderr)
    run.run(round_robin(prefix, targets), stop=lambda: time.monotonic() >= deadline)
    print(f"fuzz: {len(run.results)} cases in {time.monotonic() - started:.0f} s; out: {out}")
    print(run.table())
    return 1 if run.unknown_findings() else 0


if __name__ == "__main__":
    sys.exit(main())
