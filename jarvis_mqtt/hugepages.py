"""Weights on transparent huge pages: one anonymous mapping per loaded stage.

Decode streams every weight once per token, so with 4 KiB pages each matrix row block costs a
TLB miss and a page-table walk, and a node that has just woken for its next token walks cold
page tables. Linux backs 2 MiB-aligned ranges of a private anonymous mapping with huge pages
when asked (`madvise(MADV_HUGEPAGE)`, which the common `transparent_hugepage=madvise` setting
waits for). torch's allocator does this only for single allocations of 2 MiB and more
(`THP_MEM_ALLOC_ENABLE`), about half of a SmolLM2 layer; an arena sized for the whole stage
puts all of it on huge pages but the tail after its last whole one, which is not advised and
stays on small pages, so no memory is spent on a partly used huge page.

Where huge pages are not available (another OS, THP off) the mapping is ordinary memory.
"""

from __future__ import annotations

import logging
import math
import mmap
import re
from collections.abc import Sequence

import torch

log = logging.getLogger("jarvis.hugepages")


def _huge_page_size() -> int:
    """The kernel's transparent huge page size (2 MiB on x86-64 and 4 KiB-page arm64, 32 MiB
    with 16 KiB pages as on a Raspberry Pi 5); 2 MiB where it does not say."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


HUGE_PAGE = _huge_page_size()
ALIGN = 64  # bytes: a cache line, what torch's own allocator gives


class WeightArena:
    """Hands out tensors carved from one mapping of `nbytes` (plus alignment); a request that
    does not fit, or any platform without anonymous `mmap`, gets ordinary `torch.empty`.

    Tensors keep the mapping alive: it is unmapped when the last of them is freed.
    """

    def __init__(self, nbytes: int) -> None:
        self._buf: torch.Tensor | None = None
        self._off = 0
        try:
            # Private and anonymous: shared anonymous memory is shmem, which THP leaves alone.
            mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (AttributeError, OSError, ValueError) as e:  # not POSIX, or out of memory
            log.debug("no weight arena (%s): weights use torch's allocator", e)
            return
        self._buf = torch.frombuffer(mapping, dtype=torch.uint8)
        self._off = -self._buf.data_ptr() % HUGE_PAGE  # start on a huge page boundary
        whole = nbytes // HUGE_PAGE * HUGE_PAGE  # the tail after it stays on small pages
        if whole and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                mapping.madvise(mmap.MADV_HUGEPAGE, self._off, whole)
            except OSError as e:  # a kernel without THP: ordinary pages
                log.debug("madvise(MADV_HUGEPAGE) refused: %s", e)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of `shape` and `dtype`, from the arena when it fits."""
        nbytes = math.prod(shape) * dtype.itemsize
        start = -(-self._off // ALIGN) * ALIGN
        if self._buf is None or start + nbytes > self._buf.numel():
            return torch.empty(tuple(shape), dtype=dtype)
        self._off = start + nbytes
        return self._buf[start : start + nbytes].view(dtype).view(tuple(shape))

    def contains(self, t: torch.Tensor) -> bool:
        """Whether `t` lives in this arena."""
        if self._buf is None:
            return False
        base = self._buf.data_ptr()
        return base <= t.data_ptr() < base + self._buf.numel()


def arena_bytes(shapes: Sequence[tuple[Sequence[int], torch.dtype]]) -> int:
    """Bytes an arena needs for tensors of these shapes and dtypes, each cache-line aligned."""
    return sum(-(-(math.prod(shape) * dtype.itemsize) // ALIGN) * ALIGN for shape, dtype in shapes)


def anon_huge_bytes() -> int:
    """Bytes of this process's memory on transparent huge pages (0 where Linux does not say)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            found = re.search(r"^AnonHugePages:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return 0
    return int(found.group(1)) * 1024 if found else 0
