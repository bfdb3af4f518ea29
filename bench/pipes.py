"""The mesh's split without the mesh: the same node processes chained by OS pipes.

Each process loads one span of layers on one thread, like a node agent, and passes the hidden
state on through a pipe; the bench process embeds, runs the head and samples, like the client.
No broker, no MQTT, no event loop, no wire format: what is left is the cost of cutting the
model across processes on this host (each process's caches and page tables go cold while the
others run). Its decode rate over the single process's is the efficiency any transport could
reach here, the ceiling the mesh's figure is read against.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mpc
import struct
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import torch

from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.mesh import even_spans
from jarvis_mqtt.model import Segment
from jarvis_mqtt.runtime import EmbedStage, HeadStage, LayerSpan, load_client_stages

_HEADER = struct.Struct("<16sII")  # session, first position, rows
_READY_TIMEOUT = 120.0  # seconds for every process to load its span


def _stage(
    path: str, start: int, end: int, rx: mpc.Connection, tx: mpc.Connection, ready: mpc.Connection
) -> None:
    """One process: run `[start, end)` on what arrives on `rx`, pass the result to `tx`."""
    torch.set_num_threads(1)
    span = LayerSpan.load(ModelDir.open(path), start, end)
    ready.send(start)
    while msg := rx.recv_bytes():  # an empty message: stop, and tell the next one
        sid, pos, n = _HEADER.unpack_from(msg)
        hidden = torch.frombuffer(bytearray(msg[_HEADER.size :]), dtype=torch.float32)
        out = span(hidden.view(n, -1), [Segment(sid.decode().rstrip("\0"), pos, n)])
        tx.send_bytes(msg[: _HEADER.size] + out.numpy().tobytes())
    tx.send_bytes(b"")


@dataclass
class PipeChain:
    """`spans` in one process each, chained by pipes; a context manager that stops them all."""

    md: ModelDir
    spans: list[tuple[int, int]]
    embed: EmbedStage = field(init=False)
    head: HeadStage = field(init=False)
    procs: list[mp.process.BaseProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.embed, self.head = load_client_stages(self.md)
        if self.head.norm.weight.dtype != torch.float32:
            raise ValueError("the pipe chain passes float32 hidden states only")

    def __enter__(self) -> Self:
        ctx = mp.get_context("spawn")  # a fresh interpreter per stage, as a node agent has
        pipes = [ctx.Pipe(duplex=False) for _ in range(len(self.spans) + 1)]
        ready_rx, ready_tx = ctx.Pipe(duplex=False)
        try:
            for i, (start, end) in enumerate(self.spans):
                args = (str(self.md.path), start, end, pipes[i][0], pipes[i + 1][1], ready_tx)
                proc = ctx.Process(target=_stage, args=args, daemon=True)
                proc.start()
                self.procs.append(proc)
            for _ in self.spans:
                if not ready_rx.poll(_READY_TIMEOUT):
                    raise RuntimeError("a pipe-chain stage did not load its span in time")
                ready_rx.recv()
        except BaseException:
            self.stop()
            raise
        self._first, self._last = pipes[0][1], pipes[-1][0]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every stage by its pid (terminate, then kill), whatever state it is in."""
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.procs.clear()

    def _run(self, hidden: torch.Tensor, sid: str, pos: int) -> torch.Tensor:
        head = _HEADER.pack(sid.encode(), pos, hidden.shape[0])
        self._first.send_bytes(head + hidden.contiguous().numpy().tobytes())
        out = self._last.recv_bytes()
        return torch.frombuffer(bytearray(out[_HEADER.size :]), dtype=torch.float32).view(
            hidden.shape[0], -1
        )

    def decode(self, ids: list[int], n: int, sid: str) -> tuple[float, list[int]]:
        """(tok/s of `n` greedy decode steps after an untimed prefill of `ids`, the tokens);
        the stages keep the session's cache afterwards, so every call needs a new `sid`."""
        if len(sid.encode()) > _HEADER.size:
            raise ValueError(f"session id {sid!r} is too long for the pipe header")
        h = self._run(self.embed(torch.tensor(ids)), sid, 0)
        tok = int(self.head(h[-1:]).argmax())
        out = [tok]
        t0 = time.perf_counter()
        for i in range(n):
            h = self._run(self.embed(torch.tensor([tok])), sid, len(ids) + i)
            tok = int(self.head(h).argmax())
            out.append(tok)
        return n / (time.perf_counter() - t0), out


def spans_of(md: ModelDir, nodes: int) -> list[tuple[int, int]]:
    """The mesh's even split (`jarvis mesh up`)."""
    return even_spans(md.num_layers, nodes)
