"""The full fence the virtqueue calls: it runs, and it is the real instruction where it can be."""

from __future__ import annotations

import platform

from emulator.arch.x86_64 import fence


def test_fence_runs() -> None:
    for _ in range(1000):
        fence.full_fence()


def test_fence_is_mfence_on_x86_64() -> None:
    if platform.machine().lower() in ("x86_64", "amd64"):
        # The lock fallback is sound on x86 too, but here an executable page is expected.
        assert fence.FENCE_KIND == "mfence"
    else:
        assert fence.FENCE_KIND


def test_machine_code_and_lock_fallback_run() -> None:
    if platform.machine().lower() in ("x86_64", "amd64"):
        mfence, _page = fence._machine_code_fence(fence._X86_64_CODE)
        mfence()
    fence._lock_fence()()
