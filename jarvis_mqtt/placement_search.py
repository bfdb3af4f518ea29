"""The search behind `placement.plan` (pure): tile runs of layers with node spans, fast.

Every copy of the model is a list of *segments* (runs of layers `[start, end)`); the first copy
is one segment `[0, n)`, a partial extra copy may be several. Each node hosts at most one
contiguous span, so tiling the segments with node spans puts two copies of a layer on two
distinct nodes by construction.

Feasibility of a bottleneck `T` (every node's span takes at most `T` seconds per token and fits
its memory) walks the segments in a fixed order, each node taking as many layers as it can from
where the last one stopped. For a fixed order of nodes this greedy is optimal: a node's reach is
monotone in where it starts, so reaching further never hurts the nodes after it. Which order:

- exact: a dynamic programme over which nodes are used so far, keeping the furthest (segment,
  layer) reached; identical nodes are interchangeable, so the states are the count vectors of
  used nodes per kind (`prod(count + 1)` of them, e.g. 2^m for m distinct nodes). Used while
  that is at most `EXACT_STATES` (4096: up to 12 distinct nodes, or many more of a few kinds).
- beyond that, a heuristic: the greedy over a few orders (as given, fastest first, slowest
  first, most memory first, least memory first), keeping the best. Each order is monotone in
  `T`, so the bisection below stays exact for the union of those orders.

The least `T` is one of the finitely many span times `cost(s, e) * sec_per_layer(node)`:
`minimise` bisects over their sorted set. Times are always computed by `Costs.time`, so the
bottlenecks of the planner and of the baselines compare exactly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

EXACT_STATES = 4096  # most DP states (used-node count vectors) before falling back to heuristics


@dataclass(frozen=True)
class Segment:
    """A run of layers `[start, end)` that copy `copy` needs tiled (copy 0 is the first)."""

    start: int
    end: int
    copy: int


@dataclass(frozen=True)
class Span:
    """Node `node` (an index into the nodes) hosts layers `[start, end)` of copy `copy`."""

    node: int
    start: int
    end: int
    copy: int


class Costs:
    """Prefix sums of layer bytes and costs, and each node's memory and speed."""

    def __init__(
        self,
        layer_bytes: Sequence[int],
        layer_cost: Sequence[float],
        memory: Sequence[int],
        sec_per_layer: Sequence[float],
        *,
        overhead_bytes: int,
        kv_bytes_per_layer: int,
    ) -> None:
        self.n = len(layer_bytes)
        self.bytes_ = [0, *itertools.accumulate(layer_bytes)]
        self.cost = [0.0, *itertools.accumulate(float(c) for c in layer_cost)]
        self.memory = list(memory)
        self.sec = list(sec_per_layer)
        self.overhead = overhead_bytes
        self.kv = kv_bytes_per_layer

    @property
    def m(self) -> int:
        """Number of nodes."""
        return len(self.memory)

    def weights(self, s: int, e: int) -> int:
        """Weight bytes of layers `[s, e)`."""
        return self.bytes_[e] - self.bytes_[s]

    def need(self, s: int, e: int) -> int:
        """Memory a node needs to host `[s, e)`: overhead, weights, KV; nothing when empty."""
        return 0 if e <= s else self.overhead + self.weights(s, e) + self.kv * (e - s)

    def time(self, j: int, s: int, e: int) -> float:
        """Seconds per token node `j` spends on layers `[s, e)`."""
        return (self.cost[e] - self.cost[s]) * self.sec[j]

    def reach(self, j: int, s: int, end: int, limit: float) -> int:
        """The furthest `e` in `[s, end]` that node `j` can host from `s` within `limit` s."""
        lo, hi = s, end  # fits(lo) holds, and fits is monotone: bisect for the last one
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.need(s, mid) <= self.memory[j] and self.time(j, s, mid) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return lo


@dataclass(frozen=True)
class Cover:
    """How far a tiling got: `done` segments complete, then layer `at` of the next one."""

    done: int
    at: int
    spans: tuple[Span, ...]

    def key(self) -> tuple[int, int]:
        """Further is better: more segments done, then further into the next."""
        return (self.done, self.at)


def replay(costs: Costs, segments: Sequence[Segment], limit: float, order: Sequence[int]) -> Cover:
    """The greedy: nodes in `order`, each taking the most it can; useless nodes skipped."""
    k, at, spans = 0, segments[0].start, []
    for j in order:
        if k == len(segments):
            break
        seg = segments[k]
        e = costs.reach(j, at, seg.end, limit)
        if e == at:
            continue
        spans.append(Span(j, at, e, seg.copy))
        if e == seg.end:
            k += 1
            at = segments[k].start if k < len(segments) else 0
        else:
            at = e
    return Cover(k, at, tuple(spans))


def _kinds(costs: Costs, limit: float) -> list[list[int]]:
    """Groups of interchangeable nodes (same memory, and same speed unless time is unbounded)."""
    groups: dict[tuple[int, float], list[int]] = {}
    for j in range(costs.m):
        speed = 0.0 if limit == math.inf else costs.sec[j]  # time does not matter then
        groups.setdefault((costs.memory[j], speed), []).append(j)
    return list(groups.values())


def _exact(costs: Costs, segments: Sequence[Segment], limit: float) -> Cover | None:
    """The furthest any set and order of nodes gets; None when there are too many states."""
    kinds = _kinds(costs, limit)
    counts = [len(g) for g in kinds]
    radix = [math.prod(c + 1 for c in counts[:t]) for t in range(len(kinds))]
    states = math.prod(c + 1 for c in counts)
    if states > EXACT_STATES:
        return None
    n1, nk, last = costs.n + 1, len(kinds), len(segments)
    value = [-1] * states  # best (segment, layer) reached, encoded as segment * (n + 1) + layer
    parent = [0] * states  # previous state * nk + kind added
    value[0] = segments[0].start
    reach: dict[tuple[int, int, int], int] = {}
    best = 0
    for idx in range(states):
        v = value[idx]
        if v < 0:
            continue
        if v > value[best]:
            best = idx
        k, at = divmod(v, n1)
        if k == last:
            break
        seg = segments[k]
        for t in range(nk):
            if (idx // radix[t]) % (counts[t] + 1) == counts[t]:
                continue  # every node of this kind is used
            key = (t, at, seg.end)
            e = reach.get(key)
            if e is None:
                e = reach[key] = costs.reach(kinds[t][0], at, seg.end, limit)
            if e == at:
                continue
            if e < seg.end:
                nv = k * n1 + e
            else:
                nv = (k + 1) * n1 + (segments[k + 1].start if k + 1 < last else 0)
            nxt = idx + radix[t]
            if nv > value[nxt]:
                value[nxt], parent[nxt] = nv, idx * nk + t
    seq: list[int] = []
    idx = best
    while idx:
        idx, t = divmod(parent[idx], nk)
        seq.append(t)
    pools = [iter(g) for g in kinds]
    return replay(costs, segments, limit, [next(pools[t]) for t in reversed(seq)])


def orders(costs: Costs) -> list[list[int]]:
    """The node orders the heuristic tries, as given first."""
    given = list(range(costs.m))
    keys: list[Callable[[int], float]] = [
        lambda j: costs.sec[j],
        lambda j: -costs.sec[j],
        lambda j: -costs.memory[j],
        lambda j: costs.memory[j],
    ]
    out = [given]
    for key in keys:
        o = sorted(given, key=key)
        if o not in out:
            out.append(o)
    return out


def cover(costs: Costs, segments: Sequence[Segment], limit: float = math.inf) -> Cover:
    """The furthest tiling of `segments` within `limit` seconds per token per node."""
    exact = _exact(costs, segments, limit)
    if exact is not None:
        return exact
    return max((replay(costs, segments, limit, o) for o in orders(costs)), key=Cover.key)


def complete(segments: Sequence[Segment], c: Cover) -> bool:
    """Whether `c` tiles every segment."""
    return c.done == len(segments)


def span_times(costs: Costs, segments: Sequence[Segment]) -> list[float]:
    """Every time some node could need for some span that fits its memory, sorted."""
    seen: set[float] = set()
    reps = [g[0] for g in _kinds(costs, 0.0)]
    hi = max(s.end for s in segments)
    for j in reps:
        for s in range(hi):
            for e in range(s + 1, hi + 1):
                if costs.need(s, e) > costs.memory[j]:
                    break
                seen.add(costs.time(j, s, e))
    return sorted(seen)


def minimise(costs: Costs, segments: Sequence[Segment]) -> Cover:
    """The tiling with the least bottleneck; the caller checked it fits with unbounded time."""
    times = span_times(costs, segments)
    lo, hi = 0, len(times) - 1
    best = cover(costs, segments, times[hi]) if times else None
    if best is None or not complete(segments, best):
        return cover(costs, segments)  # cannot happen: every fitting span time is a candidate
    while lo < hi:
        mid = (lo + hi) // 2
        c = cover(costs, segments, times[mid])
        if complete(segments, c):
            hi, best = mid, c
        else:
            lo = mid + 1
    return best


def segments_of(n: int, extra: Sequence[set[int]]) -> list[Segment]:
    """Copy 0 as `[0, n)`, then each extra copy's layers as maximal runs."""
    out = [Segment(0, n, 0)]
    for c, layers in enumerate(extra, start=1):
        run: list[int] = []
        for i in sorted(layers):
            if run and i != run[-1] + 1:
                out.append(Segment(run[0], run[-1] + 1, c))
                run = []
            run.append(i)
        if run:
            out.append(Segment(run[0], run[-1] + 1, c))
    return out


def _may_fit(costs: Costs, segments: Sequence[Segment]) -> bool:
    """A quick necessary condition: a node per run at least, and memory in total."""
    usable = [mem - costs.overhead for mem in costs.memory if mem > costs.overhead]
    need = sum(costs.need(s.start, s.end) - costs.overhead for s in segments)
    return len(segments) <= len(usable) and need <= sum(usable)


def choose_copies(
    costs: Costs, replication: int, priority: Sequence[int], critical: set[int]
) -> list[set[int]]:
    """Layers of each extra copy (copies 1 .. replication-1) that memory allows.

    All of them when they fit. Otherwise extra copies are tried one layer at a time: every
    critical layer's copies first (its 2nd copy in priority order, then its 3rd, ...), then the
    other layers' the same way; each is kept if all kept so far still fit, with time unbounded.
    A layer's k-th copy is tried only if its (k-1)-th was kept. A pass over a group repeats
    while it keeps something: a copy refused as a run of its own may fit once it extends one.
    """
    n = costs.n
    full = [set(range(n)) for _ in range(replication - 1)]
    if complete(segs := segments_of(n, full), cover(costs, segs)):
        return full
    extra: list[set[int]] = [set() for _ in range(replication - 1)]
    for group in (
        [i for i in priority if i in critical],
        [i for i in priority if i not in critical],
    ):
        for c in range(replication - 1):
            added = True
            while added:  # a copy refused alone may fit once its neighbour's is in
                added = False
                for i in group:
                    if i in extra[c] or (c > 0 and i not in extra[c - 1]):
                        continue
                    extra[c].add(i)
                    segs = segments_of(n, extra)
                    if _may_fit(costs, segs) and complete(segs, cover(costs, segs)):
                        added = True
                    else:
                        extra[c].discard(i)
    return extra
