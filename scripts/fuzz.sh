#!/usr/bin/env bash
# A fuzzing campaign: hostile images of every format and hostile virtqueues, round-robin.
#   scripts/fuzz.sh MINUTES [OUTDIR] [--workers N] [--timeout S] [--targets qcow2,vpc,virtio]
# Prints a table of outcomes per format and the deduplicated findings; each finding has a
# reproducer directory under OUTDIR/findings/ (the case and a README with the commands).
# Exit status 1 when something not in KNOWN_BUGS_BEING_FIXED was found.
# One case again: .venv/bin/python -m tests.support.fuzz replay OUTDIR/findings/<name>/case
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,7s/^# \{0,1\}//p' "$0"
  exit 2
fi
[[ -x .venv/bin/python ]] || { echo "fuzz.sh: no .venv; run scripts/setup.sh first" >&2; exit 2; }
PYTHONPATH=$PWD exec .venv/bin/python -m tests.support.fuzz campaign "$@"
