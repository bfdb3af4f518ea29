"""The route of each step of one session, folded from the messages seen on the mesh (pure).

Every activation carries the route so far (`[node, start, end, t_in, t_out]` per hop) and the
result carries the whole of it, so a step's route is the longest one seen. Compute time of a hop
is `t_out - t_in` on the node's clock; transfer time is the next node's `t_in` less the previous
`t_out`, two clocks: negative values mean skew between machines.

A replay is the same work seen again: meta `{"replay": true}` (a sender rebuilding a receiver's
cache), an activation entering a layer this step already entered (a re-send, e.g. to a replica
after a node died), positions an earlier step already covered, or a second result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jarvis_mqtt import wire
from jarvis_mqtt.membership import format_layers


@dataclass
class StepRoute:
    """What is known of one step of a session; `hops` grows as the step moves along."""

    session: str
    step: int | None  # None: an error that no step could be matched to
    pos: int | None = None  # first position the step feeds
    tokens: int | None = None  # tokens the step feeds
    hops: tuple[wire.RouteHop, ...] = ()
    skipped: set[int] = field(default_factory=set)
    entered: list[tuple[int, str | None]] = field(default_factory=list)  # (layer, node) sent to
    replays: list[dict[str, Any]] = field(default_factory=list)
    replayed_on: list[str] = field(default_factory=list)  # nodes that rebuilt a cache (meta)
    replay_requests: list[dict[str, Any]] = field(default_factory=list)  # acks with need_from
    results: int = 0
    errors: list[str] = field(default_factory=list)
    first_seen: float | None = None  # wall clock of the first message, inspector's clock

    @property
    def status(self) -> str:
        """`done` once a result came back, `error` on an error, else `running`."""
        if self.errors:
            return "error"
        return "done" if self.results else "running"

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the hops with compute and transfer times in milliseconds."""
        hops: list[dict[str, Any]] = []
        prev: wire.RouteHop | None = None
        for h in self.hops:
            hops.append(
                {
                    "node": h.node,
                    "start": h.start,
                    "end": h.end,
                    "t_in": h.t_in,
                    "t_out": h.t_out,
                    "compute_ms": _ms(h.t_out - h.t_in),
                    "transfer_ms": None if prev is None else _ms(h.t_in - prev.t_out),
                }
            )
            prev = h
        compute = sum(h["compute_ms"] for h in hops)
        transfer = sum(h["transfer_ms"] or 0.0 for h in hops)
        last = self.entered[-1] if self.entered and self.status == "running" else None
        return {
            "session": self.session,
            "step": self.step,
            "status": self.status,
            "pos": self.pos,
            "tokens": self.tokens,
            "hops": hops,
            "skipped": sorted(self.skipped),
            "replay": bool(self.replays or self.replayed_on),
            "replays": list(self.replays),
            "replayed_on": list(self.replayed_on),
            "replay_requests": list(self.replay_requests),
            "errors": list(self.errors),
            "compute_ms": _ms(compute / 1e3),
            "transfer_ms": _ms(transfer / 1e3),
            "total_ms": _ms(self.hops[-1].t_out - self.hops[0].t_in) if self.hops else None,
            "waiting_at": None if last is None else {"layer": last[0], "node": last[1]},
        }


class TraceBuilder:
    """Folds the messages of one session into one `StepRoute` per step."""

    def __init__(self, session: str) -> None:
        self.session = session
        self.steps: dict[int, StepRoute] = {}
        self.orphans: list[StepRoute] = []  # errors seen before any step
        self._ends: dict[int, int] = {}  # step -> one past the last position it fed
        self._mids: dict[str, int] = {}  # activation message id -> its step, to place acks

    def add(
        self, msg: wire.Message, *, to: str | None = None, received: float | None = None
    ) -> list[StepRoute]:
        """Fold in one message (`to`: the node its topic addresses); returns steps it finished.

        A step is returned when its first result or an error arrives, and again on a
        replayed result; messages of other sessions change nothing.
        """
        if msg.sid != self.session:
            return []
        if isinstance(msg, wire.ErrorMessage):
            return [self._error(msg, received)]
        st = self.steps.get(msg.step)
        if st is None:
            st = self.steps[msg.step] = StepRoute(self.session, msg.step, first_seen=received)
        why = self._replay_reason(st, msg)
        if why is not None:
            st.replays.append(
                {"why": why, "kind": msg.KIND, "layer": msg.layer, "node": to, "pos": msg.pos}
                | {"tokens": msg.n_tokens, "time": received}
            )
        st.skipped.update(msg.skipped)
        # Nodes downstream of a replay list the nodes that rebuilt their cache in meta.
        replayed = msg.meta.get("replayed")
        if isinstance(replayed, list):
            st.replayed_on += [
                n for n in replayed if isinstance(n, str) and n not in st.replayed_on
            ]
        if isinstance(msg, wire.ResultMessage):
            st.hops = msg.route  # the whole route: authoritative
            st.results += 1
            return [st] if st.results == 1 or why is not None else []
        st.entered.append((msg.layer, to))
        self._mids[msg.mid] = msg.step
        if why is None:
            if st.pos is None:
                st.pos, st.tokens = msg.pos, msg.n_tokens
            self._ends[msg.step] = max(self._ends.get(msg.step, 0), msg.pos + msg.n_tokens)
        if not st.results and len(msg.route) > len(st.hops):
            st.hops = msg.route
        return []

    def ack(self, mid: str, by: str, need_from: int | None) -> StepRoute | None:
        """Fold in an acknowledgement; one asking for a replay is noted on its step."""
        step = self._mids.get(mid)
        if step is None or need_from is None:
            return None
        st = self.steps[step]
        st.replay_requests.append({"by": by, "need_from": need_from})
        return st

    def _replay_reason(self, st: StepRoute, msg: wire.TensorMessage) -> str | None:
        if msg.meta.get("replay"):
            return "meta"
        if isinstance(msg, wire.ResultMessage):
            return "result" if st.results else None
        if any(layer == msg.layer for layer, _ in st.entered):
            return "resend"
        before = [end for step, end in self._ends.items() if step < msg.step]
        if before and msg.pos < max(before):
            return "position"
        return None

    def _error(self, msg: wire.ErrorMessage, received: float | None) -> StepRoute:
        running = [s for s in self.steps.values() if s.status == "running"]
        pool = running or list(self.steps.values())
        if pool:
            st = max(pool, key=lambda s: s.step or 0)
        else:
            st = StepRoute(self.session, None, first_seen=received)
            self.orphans.append(st)
        st.errors.append(f"{msg.code}: {msg.text}")
        return st

    def unfinished(self) -> list[StepRoute]:
        """Steps still waiting for their result, in step order."""
        return [self.steps[k] for k in sorted(self.steps) if self.steps[k].status == "running"]

    def routes(self) -> list[StepRoute]:
        """Every step seen, in step order, after any orphan errors."""
        return [*self.orphans, *(self.steps[k] for k in sorted(self.steps))]


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def format_step(d: dict[str, Any]) -> str:
    """A step (`StepRoute.to_dict()`) as a few lines: a summary, then one line per hop."""
    pos = "" if d["pos"] is None else f"  pos {d['pos']} (+{d['tokens']})"
    flags = ""
    if d["replay"]:
        whys = {r["why"] for r in d["replays"]} | ({"replayed"} if d["replayed_on"] else set())
        flags += "  REPLAY(" + ",".join(sorted(whys)) + ")"
    timing = ""
    if d["total_ms"] is not None:
        timing = (
            f"  total {d['total_ms']:.1f} ms (compute {d['compute_ms']:.1f}, "
            f"transfer {d['transfer_ms']:.1f})"
        )
    step = "?" if d["step"] is None else d["step"]
    lines = [f"session {d['session']} step {step}  {d['status']}{pos}{timing}{flags}"]
    skipped = set(d["skipped"])
    prev_end = d["hops"][0]["start"] if d["hops"] else 0
    for h in d["hops"]:
        gap = [i for i in range(prev_end, h["start"])]
        if gap:
            mark = "skipped" if skipped.issuperset(gap) else "MISSING"
            lines.append(f"    {mark} layers {format_layers(gap)}")
        transfer = "" if h["transfer_ms"] is None else f"  transfer {h['transfer_ms']:8.2f} ms"
        lines.append(
            f"  {h['node']:<16} [{h['start']:>3}, {h['end']:>3})  "
            f"compute {h['compute_ms']:8.2f} ms{transfer}"
        )
        prev_end = h["end"]
    tail = sorted(i for i in skipped if i >= prev_end)
    if tail:
        lines.append(f"    skipped layers {format_layers(tail)}")
    for r in d["replays"]:
        where = f"layer {r['layer']}" + (f" on {r['node']}" if r["node"] else "")
        lines.append(
            f"    replay ({r['why']}): {r['kind']} {where} pos {r['pos']} (+{r['tokens']})"
        )
    for q in d["replay_requests"]:
        lines.append(f"    {q['by']} asked for a replay from position {q['need_from']}")
    if d["replayed_on"]:
        lines.append("    cache rebuilt by replay on " + ", ".join(d["replayed_on"]))
    if d["waiting_at"] is not None:
        w = d["waiting_at"]
        lines.append(
            f"    waiting at layer {w['layer']}" + (f" on {w['node']}" if w["node"] else "")
        )
    lines += [f"    error {e}" for e in d["errors"]]
    return "\n".join(lines)
