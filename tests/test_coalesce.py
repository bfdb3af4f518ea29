"""Coalescer: callers that arrive while a batch runs share the next one, each gets its rows."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from jarvis_mqtt.coalesce import Coalescer


def test_concurrent_callers_share_batches_and_get_their_own_rows() -> None:
    gate = threading.Event()
    calls: list[int] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        gate.wait(5)  # the first batch is held until everyone else has queued
        return x * 10

    async def main() -> list[torch.Tensor]:
        c = Coalescer(fn)
        try:
            first = asyncio.create_task(c(torch.tensor([[0.0]])))
            await asyncio.sleep(0.05)  # the first batch (one row) is running
            rest = [
                asyncio.create_task(c(torch.tensor([[float(i)], [i + 0.5]]))) for i in (1, 2, 3)
            ]
            await asyncio.sleep(0.05)
            gate.set()
            out = await asyncio.gather(first, *rest)
            assert (c.batches, c.rows) == (2, 7)
            return out
        finally:
            c.close()

    out = asyncio.run(main())
    assert calls == [1, 6]  # one caller alone, then the three that came meanwhile, together
    assert out[0].tolist() == [[0.0]]
    for i, rows in zip((1, 2, 3), out[1:], strict=True):
        assert rows.tolist() == [[10.0 * i], [10.0 * i + 5.0]]


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_runs() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        if (x < 0).any():
            raise ValueError("negative row")
        return x

    async def main() -> None:
        c = Coalescer(fn)
        try:
            bad = [c(torch.tensor([[-1.0]])), c(torch.tensor([[2.0]]))]
            results = await asyncio.gather(*bad, return_exceptions=True)
            assert all(isinstance(r, ValueError) for r in results)
            assert (await c(torch.tensor([[3.0]]))).tolist() == [[3.0]]
        finally:
            c.close()

    asyncio.run(main())


def test_a_cancelled_caller_does_not_break_the_batch() -> None:
    async def main() -> None:
        c = Coalescer(lambda x: x + 1)
        try:
            gone = asyncio.create_task(c(torch.zeros(1, 1)))
            kept = asyncio.create_task(c(torch.ones(1, 1)))
            await asyncio.sleep(0)
            gone.cancel()
            assert (await kept).tolist() == [[2.0]]
            with pytest.raises(asyncio.CancelledError):
                await gone
        finally:
            c.close()

    asyncio.run(main())
