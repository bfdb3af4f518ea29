"""Row-wise calls of several callers run as one: the client's LM head over every session.

A head over one row streams the whole `(hidden, vocab)` matrix from memory; over k rows it
streams it once, so k sessions whose results arrive together cost far less than k heads. No
timer decides what goes together: the first caller starts a batch on the worker thread, and
whoever arrives while it runs joins the next one. A lone caller (one chat) waits for nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

RowFn = Callable[[torch.Tensor], torch.Tensor]


class Coalescer:
    """`await c(rows)` is `fn(rows)`, computed off the event loop together with the rows of
    whoever else called meanwhile. `fn` must act row by row: `fn(cat(xs))` = `cat(fn(x))`."""

    def __init__(self, fn: RowFn, *, name: str = "coalesce") -> None:
        self._fn = fn
        self._waiting: list[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]] = []
        self._runner: asyncio.Task[None] | None = None
        # One thread: batches run one after another, and the next one forms meanwhile.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=name)
        self.batches = 0  # calls of `fn`, for stats
        self.rows = 0  # rows passed to `fn`

    async def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        fut: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._waiting.append((rows, fut))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="coalesced calls")
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                x = batch[0][0] if len(batch) == 1 else torch.cat([rows for rows, _ in batch])
                out = await loop.run_in_executor(self._worker, self._fn, x)
            except Exception as e:  # every caller of this batch gets the error
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            except BaseException:  # cancelled (the loop is closing): nobody is left waiting
                for _, fut in [*batch, *self._waiting]:
                    fut.cancel()
                raise
            self.batches += 1
            self.rows += x.shape[0]
            first = 0
            for rows, fut in batch:
                n = rows.shape[0]
                if not fut.done():  # a caller that gave up (cancelled) is skipped
                    fut.set_result(out[first : first + n])
                first += n

    def close(self) -> None:
        """Stop the worker thread (what runs finishes)."""
        self._worker.shutdown(wait=False, cancel_futures=True)
