#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up (idempotent), lint, type-check, then pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -m 'not slow and not boot' -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check vdiskfs emulator tests scripts
# mypy, strict on vdiskfs/ and emulator/ ([tool.mypy] in pyproject.toml); its cache under .venv
# makes a run after a small change take a few seconds.
start=$SECONDS
.venv/bin/mypy
echo "mypy: $((SECONDS - start)) s" >&2
# The slowest tests are listed at the end: the suite must stay within about 20 minutes. Two
# workers (pytest-xdist; VDISKFS_TEST_WORKERS changes it, 0 runs in this process): a guest boot
# keeps one core busy for a minute, and the 2-core machine ran the suite serially in 31 min.
# worksteal: a worker that runs out of tests takes some of the other's queue, so neither idles
# while the other still has long boots to run.
exec .venv/bin/python -m pytest -n "${VDISKFS_TEST_WORKERS:-2}" --dist worksteal \
  --durations=25 "$@"
