"""`jarvis plan --apply [--watch]`: publish a plan as retained assignments, and keep it current.

    apply_once(conn, settings, planner)        -> read the mesh, plan, publish what changed
    watch(conn, settings, planner, stop)       -> the same whenever contributors join or leave

The shell only moves messages: the statuses and assignments it hears are folded into a
`MeshState`, the plan comes from `planner` (pure, run in a thread), and what to publish from
`placement_apply`. Re-planning waits until membership has been still for `debounce` seconds,
so a burst of joins is one new plan, and publishes nothing when the spans stay the same.
Sessions are not dropped by a new plan: contributors switch spans make-before-break.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jarvis_mqtt import placement_apply as A
from jarvis_mqtt import topics as T
from jarvis_mqtt.errors import JarvisError, WireError
from jarvis_mqtt.inspect import Connection, mesh_client
from jarvis_mqtt.membership import MeshView, NodeStatus, format_layers
from jarvis_mqtt.placement import PlacementError, Plan
from jarvis_mqtt.transport import MeshClient, MeshMessage

log = logging.getLogger("jarvis.plan")

Entries = list[Mapping[str, Any]]  # live contributors, as `plan_cli.nodes_from_entries` reads
# (live contributors, spans of the model in place) -> the plan to apply, and notes on the input
Planner = Callable[[Entries, A.Spans], tuple[Plan, list[str]]]
TICK = 0.25  # seconds between looks at the clock while no message comes


@dataclass(frozen=True, kw_only=True)
class ApplySettings:
    """What `jarvis plan --apply` publishes and how it waits."""

    model: str  # the model's name, as in its topics
    manifest: str | None = None  # sha256 of its manifest.json, so contributors can fetch files
    settle: float = 1.0  # seconds without a retained message before the mesh counts as read
    settle_limit: float = 5.0  # seconds reading retained messages at most
    debounce: float = 2.0  # seconds membership must stay unchanged before re-planning


@dataclass
class MeshState:
    """Node statuses and retained assignments heard so far (folding them is pure)."""

    topics: T.Topics
    view: MeshView = field(default_factory=MeshView)
    current: dict[str, T.Assignment] = field(default_factory=dict)

    def fold(self, m: MeshMessage) -> bool:
        """Take in one message; True when it was a status or an assignment."""
        try:
            parsed = self.topics.parse(m.topic)
            if isinstance(parsed, T.NodeStatusTopic):
                T.fold_status(self.view, parsed, m.payload)
                return True
            if isinstance(parsed, T.AssignTopic):
                if m.payload:
                    self.current[parsed.node_id] = T.unpack_assignment(m.payload)
                else:
                    self.current.pop(parsed.node_id, None)
                return True
        except WireError as e:  # someone else's bad message: skip it, keep planning
            log.warning("ignored %s: %s", m.topic, e)
        return False

    def contributors(self) -> list[NodeStatus]:
        """Live contributors: idle statuses announcing memory."""
        return [s for s in self.view.live() if s.idle and "memory_bytes" in s.capacity]

    def entries(self, model: str) -> Entries:
        """The live contributors as planner entries for `model`: what other models use of a
        device's memory is not there to offer."""
        return [
            {"node_id": s.node_id, "capacity": leftover_capacity(s, model)}
            for s in self.contributors()
        ]

    def key(self, model: str) -> tuple[tuple[str, str], ...]:
        """What a plan of `model` depends on: who contributes, with what."""
        return tuple(
            (s.node_id, repr(sorted(leftover_capacity(s, model).items())))
            for s in self.contributors()
        )


def leftover_capacity(status: NodeStatus, model: str) -> dict[str, Any]:
    """A contributor's capacity less the memory its spans of models other than `model` take.

    A device hosting layers of two models offers each planner only what the other leaves.
    """
    cap = dict(status.capacity)
    hosting = status.load.get("hosting") if isinstance(status.load, dict) else None
    used = 0
    for h in hosting if isinstance(hosting, list) else []:
        if isinstance(h, dict) and h.get("model") != model:
            b = h.get("bytes")
            used += b if isinstance(b, int) and b > 0 else 0
    if used and isinstance(cap.get("memory_bytes"), int):
        cap["memory_bytes"] = max(cap["memory_bytes"] - used, 0)
    return cap


async def apply_once(
    conn: Connection, settings: ApplySettings, planner: Planner, out: Callable[[str], None] = print
) -> Plan:
    """Read the live contributors and retained assignments, plan, publish what changed."""
    async with mesh_client(conn) as mesh:
        state = MeshState(conn.topics)
        await _subscribe(mesh, conn.topics)
        await _settle(aiter(mesh.messages()), state, settings)
        plan, notes = await asyncio.to_thread(
            planner, state.entries(settings.model), A.spans_of(settings.model, state.current)
        )
        for note in notes:
            out(f"note: {note}")
        await publish(mesh, state, settings, plan, out)
        return plan


async def watch(
    conn: Connection,
    settings: ApplySettings,
    planner: Planner,
    stop: asyncio.Event,
    out: Callable[[str], None] = print,
) -> None:
    """Re-plan whenever the contributors change and have stayed unchanged `debounce` s."""
    loop = asyncio.get_running_loop()
    async with mesh_client(conn) as mesh:
        state = MeshState(conn.topics)
        await _subscribe(mesh, conn.topics)
        it = aiter(mesh.messages())
        await _settle(it, state, settings)
        planned: tuple[tuple[str, str], ...] | None = None
        seen = state.key(settings.model)
        changed_at = -float("inf")  # what was read at start is settled
        out(f"watching contributors for {settings.model} ({len(seen)} now)")
        while not stop.is_set():
            m = await _next(it, TICK)
            if m is not None:
                state.fold(m)
            key = state.key(settings.model)
            if key != seen:
                seen, changed_at = key, loop.time()
            if key == planned or loop.time() - changed_at < settings.debounce:
                continue
            planned = key
            try:
                plan, _ = await asyncio.to_thread(
                    planner,
                    state.entries(settings.model),
                    A.spans_of(settings.model, state.current),
                )
            except PlacementError as e:  # wait for more capacity; what runs keeps running
                out(f"cannot place {settings.model} on {len(key)} contributors: {e}")
                continue
            try:
                await publish(mesh, state, settings, plan, out)
            except JarvisError as e:  # brokers away: try again at the next change or tick
                out(f"publishing failed: {e}")
                planned = None


async def publish(
    mesh: MeshClient,
    state: MeshState,
    settings: ApplySettings,
    plan: Plan,
    out: Callable[[str], None],
) -> dict[str, T.Assignment | None]:
    """Publish the assignments `plan` changes (retained), and say what was published."""
    model = settings.model
    spans = plan.spans_by_node()
    live = [s.node_id for s in state.contributors()]
    wanted = A.assignments(model, spans, live, state.current, manifest=settings.manifest)
    changes = A.to_publish(state.current, wanted)
    if not changes:
        out(f"plan {A.plan_id(model, spans)} unchanged: {_brief(plan)}")
        return {}
    out(f"plan {A.plan_id(model, spans)}: {_brief(plan)}")
    for node, a in changes.items():
        topic = state.topics.assign(node)
        if a is None:
            await mesh.publish(topic, b"", retain=True)
            state.current.pop(node, None)
            out(f"  {node}: cleared (gone)")
            continue
        await mesh.publish(topic, T.pack_assignment(a), retain=True)
        state.current[node] = a
        text = ", ".join(f"{m} [{s}, {e})" for m, s, e in a.spans) or "nothing"
        out(f"  {node}: {text} (plan {a.plan})")
    return changes


def _brief(plan: Plan) -> str:
    spans = ", ".join(f"{p.node_id} [{p.start}, {p.end})" for p in plan.placements)
    short = plan.under_replicated if plan.replication > 1 else []
    extra = f"; fewer copies of {format_layers(short)}" if short else ""
    how = "the plan in place, about as good" if plan.method == "given" else plan.method
    return f"{spans}; {plan.tokens_per_s:.4g} tokens/s ({how}){extra}"


async def _subscribe(mesh: MeshClient, topics: T.Topics) -> None:
    await mesh.subscribe(topics.all_node_status(), qos=T.NODE_STATUS.qos)
    await mesh.subscribe(topics.all_assign())


async def _settle(it: AsyncIterator[MeshMessage], state: MeshState, s: ApplySettings) -> None:
    """Fold retained messages until `settle` s pass without one (`settle_limit` s at most)."""
    start = time.monotonic()
    quiet_until, deadline = start + s.settle, start + s.settle_limit
    while (now := time.monotonic()) < min(quiet_until, deadline):
        m = await _next(it, min(quiet_until, deadline) - now)
        if m is not None and state.fold(m) and m.retain:
            quiet_until = time.monotonic() + s.settle


async def _next(it: AsyncIterator[MeshMessage], timeout: float) -> MeshMessage | None:
    """The next message, or None after `timeout` seconds."""
    try:
        return await asyncio.wait_for(anext(it), max(timeout, 0.0))
    except TimeoutError:
        return None
