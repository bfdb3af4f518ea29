"""Contributor mode: a device offers its leftover memory and cores and hosts what it is assigned.

`jarvis node --contribute` measures the device (free memory, cores, seconds per decoder layer
of a model it has), announces that as an idle status (span `[0, 0)`), and waits for a
retained assignment from the planner (`jarvis plan --apply`). Each assigned span runs as a
`NodeAgent` in this process, one per model, so one device can host layers of two models.

Layers it has no files for are fetched first from nodes that host them (`shards.py`), each
file checked by sha256 against the manifest whose hash the assignment carries.

A new assignment is applied make-before-break: the new span loads and joins the mesh first,
then the old one leaves cleanly. Sessions it was serving are not dropped: their senders see
it leave, re-send what it held, and the new node rebuilds its cache from their replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from jarvis_mqtt import topics as T
from jarvis_mqtt.checkpoint import ModelDir, models_root
from jarvis_mqtt.errors import JarvisError, WireError
from jarvis_mqtt.membership import NodeStatus
from jarvis_mqtt.model import Segment
from jarvis_mqtt.runtime import LayerSpan
from jarvis_mqtt.shards import ShardFetcher, have_files
from jarvis_mqtt.transport import LastWill, MeshClient
from node_agent.agent import NodeAgent
from node_agent.config import NodeConfig

log = logging.getLogger("jarvis.contributor")
RETIRE_WAIT = 120.0  # seconds an old span keeps serving while the rest of a new plan comes up


def measure_capacity(base: NodeConfig, bench_model: str | None) -> dict[str, Any]:
    """What this device can offer: memory, cores and, when a model is at hand, layer speed."""
    cap: dict[str, Any] = {
        "memory_bytes": int(psutil.virtual_memory().available),
        "cores": os.cpu_count() or 1,
        "threads": torch.get_num_threads(),
        "kv_budget_bytes": base.kv_budget_bytes,
    }
    if bench_model:
        root = base.models_dir
        md = ModelDir.open(bench_model if root is None else str(root / bench_model))
        span = LayerSpan.load(md, 0, 1)
        hidden = torch.randn(16, int(md.config["hidden_size"]))
        span(hidden, [Segment("bench", 0, 16)])
        times = []
        for i in range(20):
            t0 = time.perf_counter()
            span(hidden[:1], [Segment("bench", 16 + i, 1)])
            times.append(time.perf_counter() - t0)
        cap["sec_per_layer"] = statistics.median(times)  # one decode step through one layer
        cap["bench_model"] = bench_model
    return cap


@dataclass
class Hosted:
    """A span this device runs: its agent, the task running it and how to stop it."""

    span: tuple[int, int]
    agent: NodeAgent
    task: asyncio.Task[None]
    bytes: int  # memory it takes: its layers' files and its KV budget


class Contributor:
    """One contributing device; `await Contributor(base).run()` serves until `stop` is set."""

    def __init__(
        self, base: NodeConfig, *, bench_model: str | None = None, stop: asyncio.Event | None = None
    ) -> None:
        self.base = base
        self.bench_model = bench_model
        self.stop = stop or asyncio.Event()
        self.topics = T.Topics(base.topic_root)
        self.capacity: dict[str, Any] = {}
        self.hosted: dict[str, Hosted] = {}  # model -> what runs for it
        self.plan = ""
        self._generation = 0  # suffix of hosted node ids, so old and new can overlap
        self.ready = asyncio.Event()

    def status(self, online: bool = True) -> NodeStatus:
        """The idle status that carries this device's capacity."""
        return NodeStatus(
            node_id=self.base.node_id, model="", start=0, end=0, online=online,
            time=time.time(), host=socket.gethostname(), pid=os.getpid(),
            capacity=self.capacity,
            load={
                "hosting": [
                    {
                        "model": m, "start": h.span[0], "end": h.span[1],
                        "node": h.agent.cfg.node_id, "bytes": h.bytes,
                    }
                    for m, h in self.hosted.items()
                ],
                "plan": self.plan,
            },
        )  # fmt: skip

    async def run(self) -> None:
        """Measure, announce, then host whatever the planner assigns, until `stop`."""
        base = self.base
        self.capacity = await asyncio.to_thread(measure_capacity, base, self.bench_model)
        log.info("%s: offering %s", base.node_id, self.capacity)
        status_topic = self.topics.node_status(base.node_id)
        will = LastWill(status_topic, T.pack_status(self.status(online=False)), retain=True)
        mesh = MeshClient(
            list(base.brokers), client_id=f"jarvis-{base.node_id}", keepalive=base.keepalive,
            will=will,
        )  # fmt: skip
        async with mesh:
            await mesh.subscribe(self.topics.assign(base.node_id))
            await mesh.publish(status_topic, T.pack_status(self.status()), retain=True)
            self.ready.set()
            try:
                async with asyncio.TaskGroup() as tg:
                    tasks = [
                        tg.create_task(self._heartbeat(mesh, status_topic), name="heartbeat"),
                        tg.create_task(self._assignments(mesh, tg), name="assignments"),
                    ]
                    await self.stop.wait()
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*(self._leave(m) for m in list(self.hosted)))
            finally:
                with contextlib.suppress(TimeoutError, JarvisError):
                    async with asyncio.timeout(base.graceful_timeout):
                        await mesh.publish(status_topic, b"", retain=True)

    async def _heartbeat(self, mesh: MeshClient, topic: str) -> None:
        while True:
            await asyncio.sleep(self.base.heartbeat)
            with contextlib.suppress(JarvisError):
                status = T.pack_status(self.status())
                await mesh.publish(topic, status, qos=T.NODE_STATUS.qos, retain=True)

    async def _assignments(self, mesh: MeshClient, tg: asyncio.TaskGroup) -> None:
        async for m in mesh.messages():
            if not m.payload:
                continue
            try:
                assignment = T.unpack_assignment(m.payload)
            except WireError as e:
                log.warning("%s: bad assignment: %s", self.base.node_id, e)
                continue
            await self.apply(assignment, tg)

    async def apply(self, a: T.Assignment, tg: asyncio.TaskGroup) -> None:
        """Host exactly the spans of `a`: start new ones first, then stop what they replace."""
        self.plan = a.plan
        wanted = {model: (start, end) for model, start, end in a.spans}
        for model, span in wanted.items():
            old = self.hosted.get(model)
            if old is not None and old.span == span and not old.task.done():
                continue
            try:
                await self._files(model, span, a.manifest(model))
                await self._host(model, span, tg)
            except JarvisError as e:
                log.error("%s: cannot host %s %s: %s", self.base.node_id, model, span, e)
                continue
            if old is not None:  # retire it once the new plan covers its model without it
                tg.create_task(self._retire(model, old), name=f"retire {old.agent.cfg.node_id}")
        for model in [m for m in self.hosted if m not in wanted]:
            await self._leave(model)

    async def _files(self, model: str, span: tuple[int, int], manifest: str | None) -> None:
        """Make sure the files of `span` are here, fetching what is missing or corrupt."""
        dest = (self.base.models_dir or models_root()) / model
        if await asyncio.to_thread(have_files, dest, manifest, *span):
            return
        log.info("%s: fetching %s layers [%d, %d) from the mesh", self.base.node_id, model, *span)
        t0 = time.perf_counter()
        name = f"{self.base.node_id}.fetch"
        async with ShardFetcher(list(self.base.brokers), self.topics, name) as fetcher:
            await fetcher.ensure(dest, model, manifest, *span)
        log.info(
            "%s: fetched %.1f MB of %s in %.1f s", self.base.node_id,
            fetcher.fetched_bytes / 1e6, model, time.perf_counter() - t0,
        )  # fmt: skip

    async def _host(self, model: str, span: tuple[int, int], tg: asyncio.TaskGroup) -> None:
        self._generation += 1
        cfg = dataclasses.replace(
            self.base,
            node_id=f"{self.base.node_id}.{model}.{self._generation}",
            model=model, start=span[0], end=span[1],
        )  # fmt: skip
        agent = NodeAgent(cfg)
        task = tg.create_task(self._guard(agent), name=f"host {cfg.node_id}")
        ready = asyncio.ensure_future(agent.ready.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not agent.ready.is_set():
            ready.cancel()
            raise JarvisError(f"{cfg.node_id} stopped before it was ready")
        log.info("%s: hosting %s layers [%d, %d)", self.base.node_id, model, *span)
        used = agent.shard_bytes + cfg.kv_budget_bytes
        self.hosted[model] = Hosted(span, agent, task, used)

    async def _guard(self, agent: NodeAgent) -> None:
        # A span that fails must not take the device's other spans down with it.
        try:
            await agent.run()
        except JarvisError as e:
            log.error("%s: %s", agent.cfg.node_id, e)

    async def _retire(self, model: str, old: Hosted) -> None:
        """Stop `old` once live nodes other than it host every layer of `model`.

        Devices apply a new plan at their own pace; stopping a span before its replacement
        elsewhere is up would leave a hole in the pipeline. Bounded: after RETIRE_WAIT the
        old span goes anyway (sessions then recover through custody and replay, or skip).
        """
        deadline = time.monotonic() + RETIRE_WAIT
        me = old.agent.cfg.node_id
        while time.monotonic() < deadline:
            others = [s for s in old.agent.view.live(model) if s.node_id != me]
            n = old.agent.num_layers
            if n and all(any(s.covers(i) for s in others) for i in range(n)):
                break
            await asyncio.sleep(0.1)
        await self._stop(old)

    async def _stop(self, hosted: Hosted) -> None:
        hosted.agent.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await hosted.task

    async def _leave(self, model: str) -> None:
        hosted = self.hosted.pop(model, None)
        if hosted is not None:
            await self._stop(hosted)
