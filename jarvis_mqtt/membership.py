"""Who is on the mesh: node status records and the live view built from them (pure logic).

Nodes publish a retained `NodeStatus` on their status topic as a heartbeat and leave a retained
last will marking them offline. Every node and client folds those messages into a `MeshView`;
routing reads the view. Nothing here touches the network.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from jarvis_mqtt.errors import ConfigError, WireError

HEARTBEAT_INTERVAL = 1.0  # seconds between status refreshes
STALE_AFTER = 5.0  # seconds without a heartbeat before a node counts as gone


@dataclass(frozen=True, kw_only=True)
class NodeStatus:
    """What a node announces about itself; layers are the half-open span `[start, end)`."""

    node_id: str
    model: str
    start: int
    end: int
    online: bool = True
    time: float = 0.0  # sender's wall clock, seconds since the epoch
    host: str = ""
    pid: int = 0
    capacity: Mapping[str, Any] = field(default_factory=dict)  # kv budget, cores, memory
    load: Mapping[str, Any] = field(default_factory=dict)  # sessions, queue length

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for msgpack."""
        d = asdict(self)
        d["capacity"], d["load"] = dict(self.capacity), dict(self.load)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> NodeStatus:
        """Validate a decoded payload; WireError on anything malformed."""
        if not isinstance(d, Mapping):
            raise WireError("node status is not a map")
        try:
            st = cls(
                node_id=str(d["node_id"]),
                model=str(d["model"]),
                start=int(d["start"]),
                end=int(d["end"]),
                online=bool(d.get("online", True)),
                time=float(d.get("time", 0.0)),
                host=str(d.get("host", "")),
                pid=int(d.get("pid", 0)),
                capacity=dict(d.get("capacity") or {}),
                load=dict(d.get("load") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise WireError(f"bad node status: {e!r}") from e
        if not 0 <= st.start <= st.end or (st.start == st.end and st.start != 0):
            raise WireError(f"bad node status: span [{st.start}, {st.end})")
        return st

    @property
    def idle(self) -> bool:
        """A contributor announcing capacity with no layers yet (span `[0, 0)`)."""
        return self.start == self.end

    def covers(self, layer: int) -> bool:
        """Whether `layer` lies in this node's span."""
        return self.start <= layer < self.end


@dataclass
class MeshView:
    """The latest status of every node, and which of them are live."""

    nodes: dict[str, NodeStatus] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)  # node id -> local monotonic time
    stale_after: float = STALE_AFTER

    def update(self, status: NodeStatus, now: float | None = None) -> None:
        """Fold in a status message (a heartbeat, or a will saying offline)."""
        self.nodes[status.node_id] = status
        self.seen[status.node_id] = time.monotonic() if now is None else now

    def forget(self, node_id: str) -> None:
        """Drop a node (its retained status was cleared)."""
        self.nodes.pop(node_id, None)
        self.seen.pop(node_id, None)

    def live(self, model: str | None = None, now: float | None = None) -> list[NodeStatus]:
        """Online nodes heard from recently, optionally of one model, sorted by id."""
        now = time.monotonic() if now is None else now
        return sorted(
            (
                s
                for s in self.nodes.values()
                if s.online
                and now - self.seen.get(s.node_id, -1e18) <= self.stale_after
                and (model is None or s.model == model)
            ),
            key=lambda s: s.node_id,
        )

    def covering(self, model: str, layer: int, now: float | None = None) -> list[NodeStatus]:
        """Live nodes of `model` whose span contains `layer`."""
        return [s for s in self.live(model, now) if s.covers(layer)]

    def missing_layers(self, model: str, num_layers: int, now: float | None = None) -> list[int]:
        """Layers of `model` that no live node hosts."""
        live = self.live(model, now)
        return [i for i in range(num_layers) if not any(s.covers(i) for s in live)]


def parse_layers(text: str, flag: str) -> list[int]:
    """ "0,29" -> [0, 29], the form every `--flag LAYERS` takes; ConfigError naming `flag`."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected layers like 0,29") from None


def format_layers(layers: Iterable[int]) -> str:
    """Compact text for a set of layers: `0-3, 7, 9-10`."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(set(layers)):
        if run and i != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(i)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)
