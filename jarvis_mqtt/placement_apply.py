"""From a plan to the retained assignments contributors host (pure, no I/O).

    plan_id(model, spans)                      -> a short id that changes when the spans do
    assignments(model, spans, nodes, current)  -> every node's new `Assignment`
    to_publish(current, wanted)                -> only what differs, nothing if the spans agree
    keep_stable(new, kept)                     -> the applied plan while it is about as good

An `Assignment` holds one span per model, so applying a plan of one model keeps whatever a node
was assigned of other models. Nodes that host nothing of the model get no span of it (an empty
assignment when they host nothing else): a retained assignment must never go stale.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from jarvis_mqtt.placement import Plan
from jarvis_mqtt.topics import Assignment

Spans = Mapping[str, tuple[int, int]]  # node id -> half-open span of one model
STABLE_TOLERANCE = 0.10  # keep the applied plan while its bottleneck is within 10 % of the best


def plan_id(model: str, spans: Spans) -> str:
    """12 hex digits naming the spans of `model`: equal spans, equal id."""
    text = ";".join(f"{n}={s}-{e}" for n, (s, e) in sorted(spans.items()))
    return hashlib.sha256(f"{model}:{text}".encode()).hexdigest()[:12]


def spans_of(model: str, current: Mapping[str, Assignment]) -> dict[str, tuple[int, int]]:
    """The spans of `model` in the current assignments, by node."""
    return {node: (s, e) for node, a in current.items() for m, s, e in a.spans if m == model}


def assignments(
    model: str,
    spans: Spans,
    nodes: Iterable[str],
    current: Mapping[str, Assignment],
    *,
    plan: str | None = None,
    manifest: str | None = None,
) -> dict[str, Assignment | None]:
    """What each node should be assigned: its span of `model` from `spans`, others kept.

    Covers every node of `nodes` (the live ones), of `spans` and of `current`, so a node that
    left the plan loses its span. None clears the retained assignment of a node that is gone
    and keeps nothing else (a live node gets an empty one: contributors ignore a cleared
    topic). `plan` defaults to `plan_id(model, spans)`. `manifest` (the sha256 of the model's
    manifest) goes with the span, so a node lacking the files can fetch and check them.
    """
    pid = plan_id(model, spans) if plan is None else plan
    live = set(nodes)
    out: dict[str, Assignment | None] = {}
    for node in sorted({*live, *spans, *current}):
        old = current.get(node, Assignment(()))
        others = tuple(x for x in old.spans if x[0] != model)
        mine = ((model, *spans[node]),) if node in spans else ()
        keep = others + mine
        hashes = {m: h for m, h in old.manifests if m != model and any(x[0] == m for x in keep)}
        if mine and manifest:
            hashes[model] = manifest
        a = Assignment(tuple(sorted(keep)), pid, tuple(sorted(hashes.items())))
        out[node] = a if keep or node in live else None
    return out


def to_publish(
    current: Mapping[str, Assignment], wanted: Mapping[str, Assignment | None]
) -> dict[str, Assignment | None]:
    """What to publish (None: clear): nothing while every node keeps its spans, else every
    assignment that differs from the retained one (spans or plan id)."""

    def spans(a: Assignment | None) -> tuple[tuple[str, int, int], ...]:
        return a.spans if a is not None else ()

    if all(spans(current.get(n)) == spans(a) for n, a in wanted.items()):
        return {}
    return {
        n: a for n, a in wanted.items() if current.get(n) != a and (a is not None or n in current)
    }


def keep_stable(new: Plan, kept: Plan | None, tolerance: float = STABLE_TOLERANCE) -> Plan:
    """`kept` (the plan in place) unless `new` is better by more than `tolerance`.

    Moving spans costs loading layers and replaying caches; a plan about as fast with no
    fewer copies is not worth it. Returns `new` when `kept` is None (none in place, or it no
    longer fits the nodes there are).
    """
    if kept is None:
        return new
    fewer_copies = sum(kept.coverage) < sum(new.coverage)
    slower = kept.bottleneck_s > new.bottleneck_s * (1.0 + tolerance)
    return new if fewer_copies or slower else kept
