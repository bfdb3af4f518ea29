"""Freed memory goes back to the system when asked (what a node does after freeing sessions)."""

from __future__ import annotations

import platform

import pytest
import torch

from jarvis_mqtt.heap import trim_heap


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_memory_held_below_a_live_allocation_is_returned() -> None:
    # 64 MiB in 16 KiB tensors (under malloc's mmap threshold: they come from the heap), then
    # all freed but the last, which pins the heap's top: malloc keeps the 64 MiB below it.
    chunks = [torch.ones(4096) for _ in range(4096)]
    last = chunks.pop()
    del chunks
    held = rss_anon_bytes()
    assert trim_heap()
    released = held - rss_anon_bytes()
    assert released > 48 * 2**20, f"only {released / 2**20:.1f} MiB returned"
    assert last.sum().item() == 4096
