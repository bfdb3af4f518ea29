"""Giving freed memory back to the system.

glibc keeps what a process frees for reuse: after a burst of sessions, their KV caches stay in
a node's resident memory (27-49 MiB for 8 sessions on a 5-layer SmolLM2 node) long after the
sessions ended. `malloc_trim` returns it. Elsewhere (musl, macOS) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim_heap() -> bool:
    """Return the free memory at the heap's top and its free pages to the system; False if
    this C library cannot (then nothing happened)."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
