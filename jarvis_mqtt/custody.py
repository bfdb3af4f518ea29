"""Chain of custody for activations, and the per-session history a replay needs (pure logic).

A sender (the client, or a node) keeps every activation it hands to the next node until that
node acknowledges having passed its own output on. If the receiver dies first — its last will
says offline, or its heartbeats stop (a silent cut: no TCP close, so the will would come late)
— the sender still holds the message and sends it elsewhere: to a replica of the lost layers,
or past them (layer skipping). A replica has no cache for the session, so it answers with an
acknowledgement asking for a replay, and the sender replays the session's history from
`History`, as Petals does. Nothing here touches the network.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from jarvis_mqtt.membership import MeshView

ACK_TIMEOUT = 5.0  # seconds without an ack from a live-looking node before re-sending
SILENT_AFTER = 1.5  # seconds without a heartbeat before a node counts as dead for a message
# ... provided another node was heard this long after its last heartbeat (two periods).
OTHERS_AFTER = 1.0
# When the checks themselves come late (our own process was starved or its event loop blocked),
# the heartbeats we missed may be waiting unread: judge no one until they had time to arrive.
STALL_AFTER = 0.5  # seconds between two checks that mean we were not running
STALL_GRACE = 1.0  # seconds of no verdicts after such a stall (two heartbeat periods)
HISTORY_SPARE_ROWS = 32  # at least this many rows of room when a session's history grows


@dataclass
class Pending:
    """An activation handed to `node`, entering at `layer`, for positions `[pos, pos + n)`."""

    mid: str
    sid: str
    step: int
    node: str
    layer: int
    pos: int
    n: int
    fields: Mapping[str, Any]  # cid, model, route, skipped, meta: what a re-send reuses
    deadline: float  # monotonic seconds
    # Nodes that died holding this message -> when we gave up on them (monotonic). One judged
    # dead by silence that beats again afterwards was only starved: it may take the message.
    failed: dict[str, float] = field(default_factory=dict)

    def excluded(self, view: MeshView) -> set[str]:
        """Failed nodes not heard from since they failed."""
        return {n for n, t in self.failed.items() if view.seen.get(n, float("-inf")) <= t}


@dataclass
class History:
    """Per session, the hidden states this sender sent downstream, position by position.

    It also keeps where each step began, so that a replay can be run in the same steps as the
    original (a prompt, then one token at a time): the same shapes give bit-identical caches,
    where one long replay would round differently and could change a near-tied token.
    """

    # sid -> a buffer of rows (positions, hidden), grown ahead so a decode step adds one row
    # instead of copying the whole history; the first `held[sid]` rows are the positions held.
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    starts: dict[str, list[int]] = field(default_factory=dict)  # sid -> first position of steps

    def store(
        self, sid: str, pos: int, hidden: torch.Tensor, steps: Sequence[int] | None = None
    ) -> None:
        """Record `hidden` as positions `[pos, pos + len)`; a re-send overwrites what follows.

        `steps`: the lengths of the original steps `hidden` is made of (default: one step).
        """
        lengths = list(steps) if steps else [hidden.shape[0]]
        if sum(lengths) != hidden.shape[0]:
            lengths = [hidden.shape[0]]
        buf = self.rows.get(sid)
        if buf is None or pos == 0:
            if pos != 0:
                return  # a gap: we never saw the start, so we could not replay it anyway
            buf = None
        elif pos > self.held[sid]:
            return
        end = pos + hidden.shape[0]
        if buf is None or end > buf.shape[0] or buf.shape[1:] != hidden.shape[1:]:
            grown = hidden.new_empty((end + max(end // 2, HISTORY_SPARE_ROWS), *hidden.shape[1:]))
            if buf is not None:
                grown[:pos] = buf[:pos]
            self.rows[sid] = buf = grown
        buf[pos:end] = hidden.detach()
        self.held[sid] = end
        kept = [s for s in self.starts.get(sid, [0]) if s < pos]
        self.starts[sid] = kept + _starts(pos, lengths)

    def get(self, sid: str, start: int, end: int) -> torch.Tensor | None:
        """A copy of positions `[start, end)` of a session, or None if not all are held."""
        buf = self.rows.get(sid)
        if buf is None or end > self.held[sid] or start >= end:
            return None
        return buf[start:end].clone()

    def steps(self, sid: str, start: int, end: int) -> list[int]:
        """Lengths of the original steps covering `[start, end)`, cut at `start` and `end`."""
        cuts = sorted({start, end, *(s for s in self.starts.get(sid, []) if start < s < end)})
        return [b - a for a, b in itertools.pairwise(cuts)]

    def forget(self, sid: str) -> None:
        """Drop a session."""
        self.rows.pop(sid, None)
        self.held.pop(sid, None)
        self.starts.pop(sid, None)

    @property
    def nbytes(self) -> int:
        """Bytes of the positions held (the buffers keep up to half as much again spare)."""
        return sum(self.held[sid] * t[0].numel() * t.element_size() for sid, t in self.rows.items())


def _starts(pos: int, lengths: Sequence[int]) -> list[int]:
    return [pos + sum(lengths[:i]) for i in range(len(lengths))]


@dataclass
class Custody:
    """Activations sent and not yet acknowledged, and which of them need acting on."""

    ack_timeout: float = ACK_TIMEOUT
    silent_after: float = SILENT_AFTER
    pending: dict[str, Pending] = field(default_factory=dict)  # by message id
    last_check: float | None = None  # monotonic time of the previous `due()`
    hold_until: float = 0.0  # after a stall of our own: no verdicts before this time

    def track(self, p: Pending) -> None:
        """Hold `p` until its receiver acknowledges it."""
        self.pending[p.mid] = p

    def acknowledged(self, mid: str) -> Pending | None:
        """The receiver passed `mid` on (or asks for a replay of it): release it."""
        return self.pending.pop(mid, None)

    def due(self, view: MeshView, now: float | None = None) -> list[tuple[Pending, str]]:
        """Messages to act on now, released from custody: ("dead", p) or ("resend", p).

        "dead": the receiver's will said offline, or no heartbeat from it for `silent_after`
        while other nodes' heartbeats kept arriving: silence is judged against the rest of
        the mesh, so a client that hears no one (reconnecting, starved) blames no one.
        "resend": the receiver looks alive but has not acknowledged within `ack_timeout`
        (the message, or its ack, may have been lost with a broker).
        Called every tick; after a gap of more than STALL_AFTER between two calls (our process
        was not running) nothing is due for STALL_GRACE seconds, so heartbeats that arrived
        meanwhile are read before anyone is judged silent.
        """
        now = time.monotonic() if now is None else now
        if self.last_check is not None and now - self.last_check > STALL_AFTER:
            self.hold_until = now + STALL_GRACE
        self.last_check = now
        if now < self.hold_until:
            return []
        latest = max(view.seen.values(), default=now)  # the last status heard from anyone
        out: list[tuple[Pending, str]] = []
        for mid, p in list(self.pending.items()):
            status, heard = view.nodes.get(p.node), view.seen.get(p.node)
            if status is None or heard is None or not status.online:
                out.append((p, "dead"))  # its will said offline, or it cleared its status
            elif now - heard > self.silent_after and latest - heard > OTHERS_AFTER:
                out.append((p, "dead"))  # the mesh kept beating, this node fell silent
            elif now > p.deadline:
                out.append((p, "resend"))
            else:
                continue
            del self.pending[mid]
        return out

    def forget(self, sid: str) -> None:
        """Drop everything pending for a session."""
        for mid in [m for m, p in self.pending.items() if p.sid == sid]:
            del self.pending[mid]
