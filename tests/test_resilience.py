"""Fault tests: real node processes and brokers killed mid-generation, and what the user sees."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.client import RemoteModel
from jarvis_mqtt.errors import MeshError
from jarvis_mqtt.generate import LocalModel, TokenEvent
from jarvis_mqtt.mesh import LocalMesh
from jarvis_mqtt.sampling import SamplingParams
from tests.fixtures_models import models_cache
from tests.test_pipeline import chat_ids

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PROMPT = "Tell me about the history of the city of Paris."
N = 20  # tokens generated; EOS is ignored so every run has exactly this many
KILL_AT = 6  # the fault happens after this many tokens


@pytest.fixture
def make_mesh(smollm2_dir: ModelDir, tmp_path: Path) -> Iterator[Callable[..., LocalMesh]]:
    meshes: list[LocalMesh] = []

    def make(spans: list[tuple[int, int]], **kw: object) -> LocalMesh:
        mesh = LocalMesh(
            smollm2_dir.name, nodes=len(spans), spans=spans, brokers=2,
            run_dir=tmp_path / f"mesh{len(meshes)}", models_dir=models_cache(),
            topic_root=f"test/{uuid.uuid4().hex[:8]}", **kw,  # type: ignore[arg-type]
        )  # fmt: skip
        meshes.append(mesh)
        return mesh.start()

    try:
        yield make
    finally:
        for m in meshes:
            m.stop()


@pytest.fixture(scope="module")
def intact(smollm2_dir: ModelDir) -> list[int]:
    """The reference: the same generation in one process, nothing failing."""
    local = LocalModel(smollm2_dir)
    local.tokenizer.eos_token_ids = frozenset()
    ids = chat_ids(smollm2_dir, PROMPT)
    return [e.token_id for e in local.generate(ids, SamplingParams(max_new_tokens=N))]


def run_with_fault(
    md: ModelDir,
    mesh: LocalMesh,
    fault: Callable[[list[TokenEvent]], None],
    **remote_kw: object,
) -> list[TokenEvent]:
    """Generate N tokens through `mesh`, calling `fault(events)` after KILL_AT of them."""

    async def go() -> list[TokenEvent]:
        remote = RemoteModel(md, mesh.addresses, topic_root=mesh.topic_root, **remote_kw)  # type: ignore[arg-type]
        remote.tokenizer.eos_token_ids = frozenset()
        events: list[TokenEvent] = []
        async with remote:
            await remote.wait_ready(30)
            params = SamplingParams(max_new_tokens=N)
            async for ev in remote.generate(chat_ids(md, PROMPT), params):
                events.append(ev)
                if len(events) == KILL_AT:
                    fault(events)
        return events

    return asyncio.run(go())


def served_by(ev: TokenEvent, layer: int) -> str:
    """The node that ran `layer` for this token."""
    return next(str(h["node"]) for h in ev.route if h["start"] <= layer < h["end"])


def kill(mesh: LocalMesh, node_id: str, sig: signal.Signals = signal.SIGKILL) -> None:
    os.kill(mesh.node(node_id).pid, sig)


def test_middle_node_sigkill_without_replica_skips_its_layers(
    smollm2_dir: ModelDir, make_mesh: Callable[..., LocalMesh], intact: list[int]
) -> None:
    mesh = make_mesh([(0, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 30)])
    events = run_with_fault(smollm2_dir, mesh, lambda ev: kill(mesh, "node-2"))
    assert len(events) == N  # nothing lost, nothing twice: one token per step
    assert [e.token_id for e in events[:KILL_AT]] == intact[:KILL_AT]
    assert all(e.skipped == [] for e in events[:KILL_AT])
    # Every token after the kill went around node-2's layers, and the client was told.
    assert all(e.skipped == [10, 11, 12, 13, 14] for e in events[KILL_AT:])
    assert all("node-2" not in {h["node"] for h in e.route} for e in events[KILL_AT:])


def test_middle_node_sigkill_with_replica_is_token_identical(
    smollm2_dir: ModelDir, make_mesh: Callable[..., LocalMesh], intact: list[int]
) -> None:
    mesh = make_mesh([(0, 10), (10, 20), (10, 20), (20, 30)])
    victim: list[str] = []

    def fault(events: list[TokenEvent]) -> None:
        victim.append(served_by(events[-1], 10))
        kill(mesh, victim[0])

    events = run_with_fault(smollm2_dir, mesh, fault)
    assert [e.token_id for e in events] == intact
    assert all(e.skipped == [] for e in events)
    after = events[KILL_AT:]
    survivor = {"node-1", "node-2"} - set(victim)
    assert all(served_by(e, 10) in survivor for e in after)
    # The replica rebuilt the session's cache from the replayed history, and said so.
    assert any(h.get("replay") for h in after[0].route)


def test_first_node_sigkill_never_skip_without_replica_is_a_clear_error(
    smollm2_dir: ModelDir, make_mesh: Callable[..., LocalMesh]
) -> None:
    mesh = make_mesh([(0, 10), (10, 20), (20, 30)])
    with pytest.raises(MeshError, match=r"layer 0 has no live node and may not be skipped"):
        run_with_fault(smollm2_dir, mesh, lambda ev: kill(mesh, "node-0"))


def test_broker_sigkill_mid_generation_loses_nothing(
    smollm2_dir: ModelDir, make_mesh: Callable[..., LocalMesh], intact: list[int]
) -> None:
    mesh = make_mesh([(0, 10), (10, 20), (20, 30)])
    events = run_with_fault(smollm2_dir, mesh, lambda ev: mesh.brokers[0].kill())
    assert [e.token_id for e in events] == intact
    assert all(e.skipped == [] for e in events)


def test_silent_cut_is_caught_by_the_deadline(
    smollm2_dir: ModelDir, make_mesh: Callable[..., LocalMesh], intact: list[int]
) -> None:
    """SIGSTOP: no TCP close and no will until the keepalive runs out; heartbeats stop."""
    mesh = make_mesh([(0, 10), (10, 20), (10, 20), (20, 30)])
    stopped: list[str] = []
    stall: list[float] = []

    def fault(events: list[TokenEvent]) -> None:
        stopped.append(served_by(events[-1], 10))
        kill(mesh, stopped[0], signal.SIGSTOP)

    try:
        t0 = time.monotonic()
        events = run_with_fault(smollm2_dir, mesh, fault)
        stall.append(max(e.latency for e in events[KILL_AT:]))
    finally:
        for node in stopped:
            kill(mesh, node, signal.SIGCONT)
    assert [e.token_id for e in events] == intact
    assert all(served_by(e, 10) not in stopped for e in events[KILL_AT:])
    assert stall[0] < time.monotonic() - t0  # it did stall, once, and recovered


def test_restarted_node_rejoins_and_serves_new_sessions(
    smollm2_dir: ModelDir, make_mesh: Callable[..., LocalMesh], intact: list[int]
) -> None:
    mesh = make_mesh([(0, 10), (10, 20), (10, 20), (20, 30)])

    async def chat() -> list[list[TokenEvent]]:
        replies: list[list[TokenEvent]] = []
        remote = RemoteModel(smollm2_dir, mesh.addresses, topic_root=mesh.topic_root)
        remote.tokenizer.eos_token_ids = frozenset()
        params = SamplingParams(max_new_tokens=N)
        async with remote:
            await remote.wait_ready(30)
            first = [e async for e in remote.generate(chat_ids(smollm2_dir, PROMPT), params)]
            replies.append(first)
            victim = served_by(first[-1], 10)
            kill(mesh, victim)
            n = mesh.node(victim)
            await asyncio.to_thread(mesh.start_node, victim, n.start, n.end)
            await asyncio.to_thread(mesh.wait_ready, [victim])
            # New sessions spread by load: run two at once so both replicas are used.
            second = await asyncio.gather(
                *(_collect(remote, chat_ids(smollm2_dir, PROMPT), params) for _ in range(2))
            )
            replies.extend(second)
        return replies

    replies = asyncio.run(chat())
    for r in replies:
        assert [e.token_id for e in r] == intact
    used = {served_by(r[0], 10) for r in replies[1:]}
    routes = [[h["node"] for h in r[0].route] for r in replies]
    assert used == {"node-1", "node-2"}, routes  # the restarted node is back in service


async def _collect(remote: RemoteModel, ids: list[int], params: SamplingParams) -> list[TokenEvent]:
    return [e async for e in remote.generate(ids, params)]
