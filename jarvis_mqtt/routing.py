"""Where an activation goes next: the next live layer, a replica, or a skip (pure logic)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from jarvis_mqtt.errors import MeshError
from jarvis_mqtt.membership import NodeStatus, format_layers


@dataclass(frozen=True)
class Hop:
    """Send to `node_id`, entering at layer `enter`; `skipped` are the layers bypassed first.

    `node_id` is None when every remaining layer is done: the result goes back to the client.
    """

    node_id: str | None
    enter: int
    end: int
    skipped: tuple[int, ...] = ()


def next_hop(
    live: Sequence[NodeStatus],
    layer: int,
    num_layers: int,
    *,
    exclude: Collection[str] = (),
    prefer: str | None = None,
    never_skip: Collection[int] = (),
    allow_skip: bool = False,
    extra_load: Mapping[str, int] | None = None,
) -> Hop:
    """Choose the node to run `layer` onwards.

    `live` are the live nodes of the model. A `prefer`red node (the one that holds this
    session's cache) wins when it is live and covers the layer; otherwise a node whose span
    starts exactly at the layer, then any node covering it, least loaded first (the load the
    node reported plus `extra_load`: sessions this sender placed there since). When no node
    covers a layer it is skipped if `allow_skip` and it is not in `never_skip`; otherwise a
    MeshError names the layers nobody hosts.
    """
    skipped: list[int] = []
    candidates_by_layer = [s for s in live if s.node_id not in exclude]
    for current in range(layer, num_layers):
        cands = [s for s in candidates_by_layer if s.covers(current)]
        if cands:
            best = _choose(cands, current, prefer, extra_load or {})
            return Hop(best.node_id, current, best.end, tuple(skipped))
        if not allow_skip or current in never_skip:
            why = "may not be skipped" if allow_skip else "skipping is off"
            missing = [
                i
                for i in range(current, num_layers)
                if not any(s.covers(i) for s in candidates_by_layer)
            ]
            raise MeshError(
                f"layer {current} has no live node and {why} (layers without a node: "
                f"{format_layers(missing)})"
            )
        skipped.append(current)
    return Hop(None, num_layers, num_layers, tuple(skipped))


def _choose(
    cands: Sequence[NodeStatus], layer: int, prefer: str | None, extra: Mapping[str, int]
) -> NodeStatus:
    for s in cands:
        if s.node_id == prefer:
            return s

    def key(s: NodeStatus) -> tuple[int, float, str]:
        load = float(s.load.get("sessions", 0)) if s.load else 0.0
        return (0 if s.start == layer else 1, load + extra.get(s.node_id, 0), s.node_id)

    return min(cands, key=key)
