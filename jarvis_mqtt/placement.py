"""Placement over leftover capacity (LLaMPS): which node hosts which layers (pure, no I/O).

    plan(model, nodes, replication=2)  -> Plan, or PlacementError with the missing bytes
    equal_split(...), memory_split(...) -> the baselines, as Plans
    compare(model, nodes)              -> the throughput of each, or why it does not fit

The rules:

- Memory. A node hosting layers `[s, e)` needs `overhead_bytes` + the layers' weights +
  `kv_tokens * model.kv_bytes_per_token` per layer; that must be at most its `memory_bytes`.
  A node hosting nothing needs nothing. The client keeps the embedding and the head.
- Time. A node spends `sum(layer_cost[s:e]) * sec_per_layer` seconds per token. The bottleneck
  is the largest of those over every node of every copy; throughput is `1 / bottleneck` tokens
  per second: the pipelined rate with enough requests in flight (network hops not modelled).
- Copies. `replication` copies of every layer, each copy a chain of contiguous spans over the
  whole model. A node hosts at most one span (a contributor runs one agent per model), so the
  copies of a layer are on distinct nodes. Boundaries may differ between copies: routing takes
  any live node covering the next layer, so requests can switch copies at any layer.
- Memory decides the copies, speed decides where. The first copy must fit or `plan` raises
  `PlacementError`. When all copies fit, they are placed. Otherwise extra copies go layer by
  layer: every critical layer's extra copies first (critical layers in importance order: its
  2nd copy, then the 3rd, ...), then the other layers' by importance (then by index); each is
  kept if everything kept so far still fits (see `placement_search.choose_copies`). Only then
  is the bottleneck minimised, for the copies kept.
- Search. Bisection on the bottleneck over the finite set of span times, with a greedy
  linear-partition check that is exact over node orders for up to 12 distinct nodes and a
  heuristic over a few orders beyond (see `placement_search`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jarvis_mqtt import placement_search as S
from jarvis_mqtt.errors import ConfigError
from jarvis_mqtt.membership import format_layers
from jarvis_mqtt.placement_specs import (
    ModelSpec,
    NodeSpec,
    PlacementError,
    core_seconds,
    fmt_bytes,
    read_criticality,
)

__all__ = [
    "ModelSpec",
    "NodeSpec",
    "Placement",
    "PlacementError",
    "Plan",
    "Score",
    "compare",
    "core_seconds",
    "equal_split",
    "from_spans",
    "memory_split",
    "plan",
    "read_criticality",
]

METHODS = ("planner", "equal", "memory")


@dataclass(frozen=True, kw_only=True)
class Placement:
    """One node's share of a plan: layers `[start, end)` of copy `copy`."""

    node_id: str
    start: int
    end: int
    copy: int  # 0 is the first copy of these layers
    weight_bytes: int  # the layers' weights
    need_bytes: int  # weights + KV + overhead
    memory_bytes: int  # what the node offers
    sec_per_token: float  # seconds this node spends per token
    measured: bool  # the node's speed was measured, not estimated

    @property
    def layers(self) -> int:
        """How many layers."""
        return self.end - self.start


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Who hosts what, and what it should achieve."""

    model: str
    num_layers: int
    method: str  # "planner", "equal" or "memory"
    replication: int  # copies asked for
    placements: tuple[Placement, ...]  # by copy, then first layer
    idle: tuple[str, ...]  # nodes given nothing
    coverage: tuple[int, ...]  # copies of each layer
    critical: frozenset[int]
    overhead_bytes: int  # per hosting node
    kv_bytes_per_layer: int  # KV reserved per hosted layer
    replica_missing_bytes: int = 0  # weights + KV of the extra copies memory did not allow

    @property
    def bottleneck(self) -> Placement:
        """The slowest placement: it sets the pipeline's rate."""
        return max(self.placements, key=lambda p: p.sec_per_token)

    @property
    def bottleneck_s(self) -> float:
        """Seconds per token of the slowest node."""
        return self.bottleneck.sec_per_token

    @property
    def tokens_per_s(self) -> float:
        """Pipelined throughput, tokens per second."""
        return 1.0 / self.bottleneck_s

    @property
    def latency_s(self) -> float:
        """Seconds per token of one request through the slowest complete copy (no overlap)."""
        per_copy: dict[int, float] = {}
        for p in self.placements:
            per_copy[p.copy] = per_copy.get(p.copy, 0.0) + p.sec_per_token
        full = {c for c in per_copy if self._layers_of(c) == self.num_layers}
        return max(per_copy[c] for c in full)

    def _layers_of(self, copy: int) -> int:
        return sum(p.layers for p in self.placements if p.copy == copy)

    @property
    def fully_replicated(self) -> bool:
        """Every layer has all the copies asked for."""
        return all(c == self.replication for c in self.coverage)

    @property
    def under_replicated(self) -> list[int]:
        """Layers with fewer copies than asked for."""
        return [i for i, c in enumerate(self.coverage) if c < self.replication]

    def spans_by_node(self) -> dict[str, tuple[int, int]]:
        """Node id -> its half-open span (what an assignment would send it)."""
        return {p.node_id: (p.start, p.end) for p in self.placements}

    def summary(self) -> str:
        """A few lines saying what the plan achieves and why."""
        b = self.bottleneck
        lines = [
            f"{self.model}: {self.num_layers} layers on {len(self.placements)} nodes "
            f"({self.method}), {self.tokens_per_s:.4g} tokens/s",
            f"bottleneck: {b.node_id} with layers [{b.start}, {b.end}) at "
            f"{b.sec_per_token:.4g} s/token; one request {self.latency_s:.4g} s/token",
        ]
        if self.replication > 1:
            if self.fully_replicated:
                lines.append(f"every layer on {self.replication} distinct nodes")
            else:
                short = self.under_replicated
                lines.append(
                    f"memory allows fewer than {self.replication} copies of layers "
                    f"{format_layers(short)} ({fmt_bytes(self.replica_missing_bytes)} short); "
                    f"critical layers {format_layers(self.critical) or 'none'} were served first"
                )
        if self.idle:
            lines.append(f"idle (not needed): {', '.join(self.idle)}")
        if not all(p.measured for p in self.placements):
            lines.append("some speeds are estimates from core counts, not measurements")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "model": self.model,
            "num_layers": self.num_layers,
            "method": self.method,
            "replication": self.replication,
            "fully_replicated": self.fully_replicated,
            "under_replicated": self.under_replicated,
            "replica_missing_bytes": self.replica_missing_bytes,
            "critical": sorted(self.critical),
            "coverage": list(self.coverage),
            "bottleneck": {"node": self.bottleneck.node_id, "sec_per_token": self.bottleneck_s},
            "tokens_per_s": self.tokens_per_s,
            "latency_s": self.latency_s,
            "overhead_bytes": self.overhead_bytes,
            "kv_bytes_per_layer": self.kv_bytes_per_layer,
            "placements": [
                {
                    "node": p.node_id,
                    "start": p.start,
                    "end": p.end,
                    "copy": p.copy,
                    "weight_bytes": p.weight_bytes,
                    "need_bytes": p.need_bytes,
                    "memory_bytes": p.memory_bytes,
                    "sec_per_token": p.sec_per_token,
                    "measured": p.measured,
                }
                for p in self.placements
            ],
            "idle": list(self.idle),
        }


@dataclass(frozen=True, kw_only=True)
class Score:
    """One method's result in `compare`: its plan, or why it does not fit."""

    method: str
    plan: Plan | None
    reason: str = ""  # why it does not fit
    missing_bytes: int = 0

    @property
    def fits(self) -> bool:
        """Whether the method found a placement."""
        return self.plan is not None

    @property
    def tokens_per_s(self) -> float | None:
        """Throughput, None when it does not fit."""
        return self.plan.tokens_per_s if self.plan else None

    @property
    def bottleneck_s(self) -> float | None:
        """Seconds per token of the slowest node, None when it does not fit."""
        return self.plan.bottleneck_s if self.plan else None


# -- the planner ---------------------------------------------------------------------------------


def _costs(model: ModelSpec, nodes: Sequence[NodeSpec], overhead: int, kv_tokens: int) -> S.Costs:
    if overhead < 0 or kv_tokens < 0:
        raise ConfigError("overhead_bytes and kv_tokens must be >= 0")
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"duplicate node ids in {sorted(ids)}")
    return S.Costs(
        model.layer_bytes,
        model.layer_cost,
        [n.memory_bytes for n in nodes],
        [n.sec_per_layer for n in nodes],
        overhead_bytes=overhead,
        kv_bytes_per_layer=kv_tokens * model.kv_bytes_per_token,
    )


def plan(
    model: ModelSpec,
    nodes: Sequence[NodeSpec],
    *,
    replication: int = 1,
    critical: Collection[int] = (),
    overhead_bytes: int = 0,
    kv_tokens: int = 0,
) -> Plan:
    """The placement with the least bottleneck, with `replication` copies as memory allows.

    `critical` adds to `model.critical`. `overhead_bytes` is what a hosting node needs besides
    layers (runtime, buffers); `kv_tokens` the KV cache it reserves per layer, in tokens.
    Raises PlacementError, with `missing_bytes`, when not even one copy fits.
    """
    if replication < 1:
        raise ConfigError(f"replication must be >= 1, not {replication}")
    costs = _costs(model, nodes, overhead_bytes, kv_tokens)
    crit = set(model.critical) | set(critical)
    if any(not 0 <= i < model.num_layers for i in crit):
        raise ConfigError(f"critical layers outside [0, {model.num_layers}): {sorted(crit)}")
    n = model.num_layers
    one = S.cover(costs, [S.Segment(0, n, 0)])
    if one.done == 0:
        raise _no_fit(model, nodes, costs, one.at)
    extra = S.choose_copies(costs, replication, model.priority(crit), crit)
    segments = S.segments_of(n, extra)
    best = S.minimise(costs, segments)
    short = sum(
        costs.need(i, i + 1) - costs.overhead for e in extra for i in range(n) if i not in e
    )
    return _build(
        model, nodes, costs, best.spans, method="planner", replication=replication,
        critical=frozenset(crit), replica_missing_bytes=short,
    )  # fmt: skip


def _no_fit(model: ModelSpec, nodes: Sequence[NodeSpec], costs: S.Costs, at: int) -> PlacementError:
    """Layers `[at, n)` found no room: their weights and KV are the missing bytes."""
    n = model.num_layers
    missing = costs.need(at, n) - costs.overhead
    offered = sum(max(0, nd.memory_bytes - costs.overhead) for nd in nodes)
    needed = costs.need(0, n) - costs.overhead
    text = (
        f"{model.name} does not fit: layers [{at}, {n}) have no node with room, "
        f"{missing} bytes ({fmt_bytes(missing)}) missing; one more node with "
        f"{fmt_bytes(missing + costs.overhead)} free would do. All {len(nodes)} nodes offer "
        f"{fmt_bytes(offered)} after overhead for {fmt_bytes(needed)} of layers and KV"
    )
    if offered >= needed:
        text += " (enough in total, but not in pieces that hold whole contiguous layers)"
    return PlacementError(text, missing_bytes=missing)


def _build(
    model: ModelSpec,
    nodes: Sequence[NodeSpec],
    costs: S.Costs,
    spans: Sequence[S.Span],
    *,
    method: str,
    replication: int,
    critical: frozenset[int],
    replica_missing_bytes: int = 0,
) -> Plan:
    coverage = [0] * model.num_layers
    placements = []
    for sp in sorted(spans, key=lambda sp: (sp.copy, sp.start)):
        nd = nodes[sp.node]
        for i in range(sp.start, sp.end):
            coverage[i] += 1
        placements.append(
            Placement(
                node_id=nd.node_id,
                start=sp.start,
                end=sp.end,
                copy=sp.copy,
                weight_bytes=costs.weights(sp.start, sp.end),
                need_bytes=costs.need(sp.start, sp.end),
                memory_bytes=nd.memory_bytes,
                sec_per_token=costs.time(sp.node, sp.start, sp.end),
                measured=nd.measured,
            )
        )
    used = {sp.node for sp in spans}
    return Plan(
        model=model.name, num_layers=model.num_layers, method=method, replication=replication,
        placements=tuple(placements),
        idle=tuple(nd.node_id for j, nd in enumerate(nodes) if j not in used),
        coverage=tuple(coverage), critical=critical, overhead_bytes=costs.overhead,
        kv_bytes_per_layer=costs.kv, replica_missing_bytes=replica_missing_bytes,
    )  # fmt: skip


def from_spans(
    model: ModelSpec,
    nodes: Sequence[NodeSpec],
    spans: Mapping[str, tuple[int, int]],
    *,
    replication: int = 1,
    critical: Collection[int] = (),
    overhead_bytes: int = 0,
    kv_tokens: int = 0,
) -> Plan:
    """The plan that hosts `spans` (node id -> `[start, end)`), e.g. one already applied.

    PlacementError when a node is not among `nodes`, a span does not fit its node's memory,
    or the spans do not chain into at least one full copy of the model.
    """
    costs = _costs(model, nodes, overhead_bytes, kv_tokens)
    index = {nd.node_id: j for j, nd in enumerate(nodes)}
    chains: list[int] = []  # the layer each copy has reached
    out: list[S.Span] = []
    for node_id, (start, end) in sorted(spans.items(), key=lambda kv: (kv[1], kv[0])):
        j = index.get(node_id)
        if j is None or not 0 <= start < end <= model.num_layers:
            raise PlacementError(f"{node_id} [{start}, {end}): no such node or layers")
        if costs.need(start, end) > nodes[j].memory_bytes:
            raise PlacementError(f"{node_id} [{start}, {end}) does not fit its memory")
        copy = next((c for c, at in enumerate(chains) if at == start), len(chains))
        chains[copy:copy + 1] = [end]  # fmt: skip
        out.append(S.Span(j, start, end, copy))
    if not any(_full(out, c, model.num_layers) for c in range(len(chains))):
        raise PlacementError("the spans do not chain into a full copy of the model")
    return _build(
        model, nodes, costs, out, method="given", replication=replication,
        critical=frozenset(set(model.critical) | set(critical)),
    )  # fmt: skip


def _full(spans: Sequence[S.Span], copy: int, n: int) -> bool:
    """Whether copy `copy` of `spans` covers `[0, n)` exactly once, in one chain."""
    at = 0
    for sp in sorted((sp for sp in spans if sp.copy == copy), key=lambda sp: sp.start):
        if sp.start != at:
            return False
        at = sp.end
    return at == n


# -- baselines -----------------------------------------------------------------------------------


def _even(total: int, parts: int) -> list[int]:
    """`total` in `parts` near-equal integers, the larger first."""
    q, r = divmod(total, parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


def _proportional(total: int, weights: Sequence[int]) -> list[int]:
    """`total` split in proportion to `weights`, largest remainders rounded up (earlier first)."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    out = [int(x) for x in exact]
    by_rest = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in by_rest[: total - sum(out)]:
        out[i] += 1
    return out


def _split(
    method: str,
    model: ModelSpec,
    nodes: Sequence[NodeSpec],
    *,
    replication: int,
    overhead_bytes: int,
    kv_tokens: int,
) -> Plan:
    """Nodes in the given order, cut into `replication` consecutive groups, one copy each."""
    costs = _costs(model, nodes, overhead_bytes, kv_tokens)
    n = model.num_layers
    if replication < 1 or len(nodes) < replication:
        raise PlacementError(f"{method} split: {replication} copies need {replication} nodes")
    spans: list[S.Span] = []
    first = 0
    for copy, size in enumerate(_even(len(nodes), replication)):
        group = range(first, first + size)
        first += size
        if method == "equal":
            counts = _even(n, size)
        else:
            usable = [max(0, nodes[j].memory_bytes - overhead_bytes) for j in group]
            if not any(usable):
                raise PlacementError(
                    "memory split: no memory left after overhead", missing_bytes=costs.need(0, n)
                )
            counts = _proportional(n, usable)
        start = 0
        for j, count in zip(group, counts, strict=True):
            if count:
                spans.append(S.Span(j, start, start + count, copy))
            start += count
    over = [(sp, costs.need(sp.start, sp.end) - nodes[sp.node].memory_bytes) for sp in spans]
    over = [(sp, b) for sp, b in over if b > 0]
    if over:
        sp, worst = max(over, key=lambda x: x[1])
        raise PlacementError(
            f"{method} split does not fit: {len(over)} nodes over memory by "
            f"{fmt_bytes(sum(b for _, b in over))} in all; worst {nodes[sp.node].node_id} with "
            f"layers [{sp.start}, {sp.end}), {fmt_bytes(worst)} over",
            missing_bytes=sum(b for _, b in over),
        )
    return _build(
        model, nodes, costs, spans, method=method, replication=replication,
        critical=model.critical,
    )  # fmt: skip


def equal_split(
    model: ModelSpec,
    nodes: Sequence[NodeSpec],
    *,
    replication: int = 1,
    overhead_bytes: int = 0,
    kv_tokens: int = 0,
) -> Plan:
    """Baseline: the same number of layers on each node, in the given order."""
    return _split("equal", model, nodes, replication=replication,
                  overhead_bytes=overhead_bytes, kv_tokens=kv_tokens)  # fmt: skip


def memory_split(
    model: ModelSpec,
    nodes: Sequence[NodeSpec],
    *,
    replication: int = 1,
    overhead_bytes: int = 0,
    kv_tokens: int = 0,
) -> Plan:
    """Baseline: layers in proportion to each node's memory after overhead, in the given order."""
    return _split("memory", model, nodes, replication=replication,
                  overhead_bytes=overhead_bytes, kv_tokens=kv_tokens)  # fmt: skip


def compare(
    model: ModelSpec,
    nodes: Sequence[NodeSpec],
    *,
    replication: int = 1,
    critical: Collection[int] = (),
    overhead_bytes: int = 0,
    kv_tokens: int = 0,
) -> dict[str, Score]:
    """The planner and both baselines on the same input: `planner`, `equal`, `memory`."""
    kw: dict[str, Any] = dict(replication=replication, overhead_bytes=overhead_bytes,
                              kv_tokens=kv_tokens)  # fmt: skip
    runs = {
        "planner": lambda: plan(model, nodes, critical=critical, **kw),
        "equal": lambda: equal_split(model, nodes, **kw),
        "memory": lambda: memory_split(model, nodes, **kw),
    }
    out = {}
    for method, run in runs.items():
        try:
            out[method] = Score(method=method, plan=run())
        except PlacementError as e:  # an infeasible method is a result here, not a failure
            out[method] = Score(method=method, plan=None, reason=str(e),
                                missing_bytes=e.missing_bytes)  # fmt: skip
    return out
