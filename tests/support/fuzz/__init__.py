"""vdiskfs's own fuzzing harness: hostile images and hostile virtqueues, run in a sandbox.

A *case* is a directory: the files of one image tree (an image, its backing files, extents,
FIFOs...) and a ``case.json`` saying what to open and how. :mod:`.seeds` builds small valid
trees of every format with the test builders; :mod:`.mutate` breaks copies of them the way an
attacker would (header fields at boundary values, metadata tables pointing anywhere, truncation,
hostile reference names, partition entries), re-sealing checksums so that the damage reaches
past the first check; :mod:`.virtio` makes virtqueue cases for the virtio-blk device.

:mod:`.runner` runs each case in a forked child under a time and memory limit (:mod:`.target`
is what the child does: open the image as ``vdiskfs info`` does and read all of it) and
classifies the outcome: ok, clean error, unexpected exception, hang, memory, input modified,
file opened outside the case directory, crash. Findings are deduplicated by (outcome,
exception type, innermost project frame) and written out as reproducer directories.

``scripts/fuzz.sh MINUTES [OUTDIR]`` runs a campaign; ``python -m tests.support.fuzz replay
CASE`` runs one case again; ``tests/fuzz`` runs a fixed-seed set in the test suite.
"""
