"""Matrix products of decode: weights stored transposed, wide GEMVs split over threads."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

# Decode multiplies one row by each weight matrix (a GEMV) and is bound by memory bandwidth.
# Measured here (x86-64, torch 2.13 CPU): `x @ W_t` with the weight stored (in, out) streams
# 1.4-1.7x faster than `F.linear(x, W)` on the (out, in) layout, and torch runs a GEMV on one
# thread only, so wide matrices are split by columns over a small pool of threads.
_SPLIT_MIN_COLS = 2048  # narrower matrices are not worth a thread hand-off
_SPLIT_MAX_ROWS = 4  # more rows make it a GEMM, which torch already parallelises
_pools: dict[int, ThreadPoolExecutor] = {}  # helper threads -> pool, follows set_num_threads


def _gemv_pool() -> tuple[ThreadPoolExecutor, int] | None:
    helpers = torch.get_num_threads() - 1
    if helpers < 1:
        return None
    if helpers not in _pools:
        _pools[helpers] = ThreadPoolExecutor(helpers, thread_name_prefix="gemv")
    return _pools[helpers], helpers


def matmul_t(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """`x @ w_t` for a weight stored transposed, `(in, out)`; wide GEMVs split over threads
    where that was measured to pay on this machine."""
    cols = w_t.shape[1]
    found = _gemv_pool() if x.shape[0] <= _SPLIT_MAX_ROWS and cols >= _SPLIT_MIN_COLS else None
    if found is None or not _split_pays(w_t, *found):
        return x @ w_t
    return _split(x, w_t, *found)


def _split(
    x: torch.Tensor, w_t: torch.Tensor, pool: ThreadPoolExecutor, helpers: int
) -> torch.Tensor:
    cols = w_t.shape[1]
    step = -(-cols // (helpers + 1))
    futures = [pool.submit(torch.matmul, x, w_t[:, i : i + step]) for i in range(step, cols, step)]
    first = x @ w_t[:, :step]
    return torch.cat([first, *(f.result() for f in futures)], dim=-1)


# (rows in, cols out, dtype, helper threads) -> whether splitting measured faster here. Two
# vCPUs that share one core's memory bandwidth gain nothing from a split and lose the
# hand-off (measured: 15.5 tok/s split, 17.3 not, on such a VM; 1.27x faster on another).
_SPLIT_PAYS: dict[tuple[int, int, torch.dtype, int], bool] = {}
_CALIBRATION_ROUNDS = 7
_SPLIT_MARGIN = 0.9  # the split must be at least 10 % faster to be used


def _split_pays(w_t: torch.Tensor, pool: ThreadPoolExecutor, helpers: int) -> bool:
    key = (w_t.shape[0], w_t.shape[1], w_t.dtype, helpers)
    pays = _SPLIT_PAYS.get(key)
    if pays is None:  # once per shape and process: a few GEMVs of this weight, both ways
        x = torch.zeros(1, w_t.shape[0], dtype=w_t.dtype)
        whole, split = float("inf"), float("inf")
        for _ in range(_CALIBRATION_ROUNDS):  # interleaved, best of each: noise hurts both
            t0 = time.perf_counter()
            x @ w_t
            t1 = time.perf_counter()
            _split(x, w_t, pool, helpers)
            t2 = time.perf_counter()
            whole, split = min(whole, t1 - t0), min(split, t2 - t1)
        pays = _SPLIT_PAYS[key] = split < _SPLIT_MARGIN * whole
    return pays


# Makes an uninitialised tensor of a shape and dtype: `torch.empty`, or a `WeightArena`'s.
Alloc = Callable[[Sequence[int], torch.dtype], torch.Tensor]


def torch_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The default `Alloc`: torch's own allocator."""
    return torch.empty(tuple(shape), dtype=dtype)


def transposed(
    *weights: torch.Tensor, dtype: torch.dtype | None = None, alloc: Alloc = torch_empty
) -> torch.Tensor:
    """`cat(weights).t().to(dtype)` as one contiguous `(in, out)` tensor from `alloc`, written
    in place: no temporary copy (cast or transposed), whose freed pages the allocator would
    keep and the process would carry. The weights are only read: they may be views of a
    mapped file.

    Without grad: copying from a `Parameter` would record an autograd graph on the result that
    keeps every source weight alive (and a mapped file resident) as long as the copy lives."""
    rows = sum(w.shape[0] for w in weights)
    out = alloc((weights[0].shape[1], rows), dtype or weights[0].dtype)
    col = 0
    with torch.no_grad():
        for w in weights:
            out[:, col : col + w.shape[0]].copy_(w.t())
            col += w.shape[0]
    return out
