"""The live mesh as a table: one row per node from the retained statuses (pure, no I/O).

A node's state is `online`, `offline` (its last will, or a clean exit, said so), `stale` (no
heartbeat for `STALE_AFTER` seconds by its own clock, e.g. a retained status of a node that
died while a broker was down) or `invalid` (a status payload that does not decode).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.table import Table

from jarvis_mqtt import topics as T
from jarvis_mqtt.errors import WireError
from jarvis_mqtt.inspect_decode import jsonable
from jarvis_mqtt.membership import STALE_AFTER, NodeStatus, format_layers

STATE_STYLE = {"online": "green", "stale": "yellow", "offline": "red", "invalid": "magenta"}


@dataclass
class NodeBoard:
    """The latest status payload of every node, decoded or not."""

    statuses: dict[str, NodeStatus] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)  # node id -> why its status is bad

    def add(self, node_id: str, payload: bytes) -> None:
        """Fold in one payload of `{root}/node/{node_id}/status`; empty means it was cleared."""
        self.statuses.pop(node_id, None)
        self.invalid.pop(node_id, None)
        if not payload:
            return
        try:
            self.statuses[node_id] = T.unpack_status(payload)
        except WireError as e:
            self.invalid[node_id] = str(e)


def node_state(status: NodeStatus, now: float, stale_after: float = STALE_AFTER) -> str:
    """`online`, `offline` or `stale` at wall-clock time `now`."""
    if not status.online:
        return "offline"
    return "stale" if now - status.time > stale_after else "online"


def node_rows(
    board: NodeBoard, now: float, stale_after: float = STALE_AFTER
) -> list[dict[str, Any]]:
    """One plain row per node, sorted by model, first layer, id; `age` in seconds."""
    rows: list[dict[str, Any]] = []
    for st in board.statuses.values():
        load = dict(st.load)
        rows.append(
            {
                "node": st.node_id,
                "model": st.model,
                "start": st.start,
                "end": st.end,
                "host": st.host,
                "pid": st.pid,
                "capacity": jsonable(st.capacity),
                "load": jsonable(load),
                "sessions": load.get("sessions"),
                "queue": load.get("queue"),
                "kv_bytes": load.get("kv_bytes"),
                "heartbeat": st.time,
                "age": round(now - st.time, 3),
                "state": node_state(st, now, stale_after),
            }
        )
    for node, why in board.invalid.items():
        rows.append({"node": node, "model": "", "start": -1, "end": -1, "state": "invalid"})
        rows[-1]["error"] = why
    return sorted(rows, key=lambda r: (r["model"], r["start"], r["node"]))


def coverage(rows: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Per model, the layers some online node hosts, as `0-29`."""
    layers: dict[str, set[int]] = {}
    for r in rows:
        if r["state"] == "online":
            layers.setdefault(r["model"], set()).update(range(r["start"], r["end"]))
    return {m: format_layers(ls) for m, ls in sorted(layers.items())}


def nodes_table(rows: list[dict[str, Any]], title: str = "mesh nodes") -> Table:
    """The rows as a rich table, states coloured, per-model coverage as the caption.

    Compact enough for 80 columns: one line per node; model, host and capacity shrink first.
    """
    t = Table(
        title=title, caption=_caption(rows), box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
        collapse_padding=True,
    )  # fmt: skip
    for col, right, squeeze in (
        ("node", False, False), ("model", False, True), ("layers", True, False),
        ("host", False, True), ("pid", True, False), ("capacity", False, True),
        ("sess", True, False), ("queue", True, False), ("kv", True, False),
        ("beat", True, False), ("state", False, False),
    ):  # fmt: skip
        t.add_column(
            col, justify="right" if right else "left", no_wrap=not squeeze, overflow="ellipsis"
        )
    for r in rows:
        style = STATE_STYLE.get(r["state"], "")
        if r["state"] == "invalid":
            why = r["error"] if len(r["error"]) <= 40 else r["error"][:39] + "…"
            t.add_row(r["node"], "", "", "", "", why, "", "", "", "", f"[{style}]invalid")
            continue
        t.add_row(
            r["node"],
            r["model"],
            f"[{r['start']},{r['end']})",
            r["host"],
            str(r["pid"]),
            _capacity(r["capacity"]),
            _opt(r["sessions"]),
            _opt(r["queue"]),
            _mib(r["kv_bytes"]),
            f"{r['age']:.1f}s",
            f"[{style}]{r['state']}",
        )
    return t


def _caption(rows: list[dict[str, Any]]) -> str:
    cov = coverage(rows)
    if not rows:
        return "no node status seen"
    if not cov:
        return "no node online"
    return "; ".join(f"{m}: layers {ls} online" for m, ls in cov.items())


def _capacity(cap: dict[str, Any]) -> str:
    """KV budget, cores and threads: `kv 512M 4c/2t` (the rest is in `--json`)."""
    parts = []
    if "kv_budget_bytes" in cap:
        parts.append(f"kv {_mib(cap['kv_budget_bytes'])}")
    if "cores" in cap:
        parts.append(f"{cap['cores']}c" + (f"/{cap['threads']}t" if "threads" in cap else ""))
    return " ".join(parts)


def _opt(value: Any) -> str:
    return "" if value is None else str(value)


def _mib(n: Any) -> str:
    return f"{n / 2**20:.0f}M" if isinstance(n, int | float) else _opt(n)
