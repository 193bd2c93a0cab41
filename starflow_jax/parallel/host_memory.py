"""Keep freed host memory in the process (glibc ``mallopt``), so that the XLA:CPU runtime's
per-execution temporaries do not page-fault on every step.

XLA:CPU allocates a compiled program's temporaries (hundreds of MB for a training step)
with ``malloc`` on every execution and frees them at the end. By default glibc serves
blocks that large with ``mmap`` (or from per-thread arenas that it trims with
``madvise``) and hands them back to the kernel on ``free``, so every execution touches
fresh pages: on ``configs/bench_s.py`` 212,000 minor page faults and 0.39 s of kernel
time per training step (``docs/performance.md``). With one arena, no ``mmap`` for large
blocks and no trimming, freed blocks are reused by the next step and the faults vanish.

The price: the process keeps its peak heap (it never shrinks). ``starflow-jax`` applies it
at start-up on Linux with glibc; ``STARFLOW_KEEP_HOST_MEMORY=0`` turns it off."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int: free memory at the heap top above this is trimmed

_applied: bool | None = None


def keep_freed_host_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (one arena, no ``mmap`` for large blocks,
    no trimming). Returns whether the settings are in effect; a no-op returning ``False``
    off Linux/glibc or with ``STARFLOW_KEEP_HOST_MEMORY=0``. Call it before JAX starts
    its threads (the arena limit only binds threads that have not allocated yet)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("STARFLOW_KEEP_HOST_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        _ = libc.gnu_get_libc_version  # glibc only (musl has no mallopt tuning of this kind)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = [mallopt(M_ARENA_MAX, 1), mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, _TRIM_NEVER)]
    _applied = all(r == 1 for r in ok)
    return _applied
