"""Sending activations downstream with custody: the part nodes and clients share.

`Forwarder.send` picks the next live node (sticky per session: its KV cache lives there),
publishes, records the rows in the session's history and keeps the message in custody until
the receiver acknowledges it; `send_nowait` does the same in the call, when a route is known.
`tick` re-sends what a dead receiver held — to a replica, or past the lost layers — and
`on_ack` answers a receiver's request for a replay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any

import torch

from jarvis_mqtt import topics as T
from jarvis_mqtt import wire
from jarvis_mqtt.custody import Custody, History, Pending
from jarvis_mqtt.errors import MeshError
from jarvis_mqtt.membership import MeshView
from jarvis_mqtt.outbox import Outbox
from jarvis_mqtt.routing import Hop, next_hop

log = logging.getLogger("jarvis.forward")
# A route that finds no live node is tried again for this long, reading statuses meanwhile:
# after our own event loop was held up (a tokenizer loading, a long head) every heartbeat
# we have not read yet looks stale, and the nodes are in fact there.
ROUTE_GRACE = 2.0  # seconds: over the 1.5 s after which a silent node counts as gone
ROUTE_RETRY = 0.05

# (cid, sid, ref mid, code, text) -> None: how the owner reports a message it cannot deliver.
OnError = Callable[[str, str, str, str, str], Awaitable[None]]


def skip_policy(meta: Mapping[str, Any]) -> tuple[bool, list[int]]:
    """The client's layer-skip policy carried in a message's meta."""
    never = meta.get("never_skip", [])
    ok = isinstance(never, list) and all(isinstance(i, int) for i in never)
    return bool(meta.get("allow_skip", False)), (never if ok else [])


class Forwarder:
    """Downstream sends of one sender (`me`: a node id or a client id)."""

    def __init__(
        self,
        outbox: Outbox,
        topics: T.Topics,
        view: MeshView,
        *,
        model: str,
        num_layers: int,
        me: str,
        on_error: OnError,
        custody: Custody | None = None,
    ) -> None:
        # Sends of one wave (or of sessions stepping together) leave as one bundle per node.
        self.outbox, self.topics, self.view = outbox, topics, view
        self.model, self.num_layers, self.me = model, num_layers, me
        self.on_error = on_error
        self.custody = custody or Custody()
        self.history = History()
        self.next: dict[str, str] = {}  # session -> node holding its downstream cache
        self.failovers = 0  # re-sends to another node, for stats
        # Sent by `send_nowait` and recorded in the history at the next loop turn.
        self._unrecorded: list[
            tuple[Pending, torch.Tensor, torch.Tensor | None, int | None, Sequence[int] | None]
        ] = []

    def forget(self, sid: str) -> None:
        """Drop a session's history, custody and stickiness."""
        self._unrecorded = [u for u in self._unrecorded if u[0].sid != sid]
        self.history.forget(sid)
        self.custody.forget(sid)
        self.next.pop(sid, None)

    async def send(
        self,
        hidden: torch.Tensor,
        *,
        layer: int,
        pos: int,
        step: int,
        sid: str,
        cid: str,
        route: Sequence[wire.RouteHop] = (),
        skipped: Sequence[int] = (),
        meta: Mapping[str, Any] | None = None,
        history_rows: torch.Tensor | None = None,
        history_pos: int | None = None,
        history_steps: Sequence[int] | None = None,
    ) -> str | None:
        """Send `hidden` (positions from `pos`) to whoever runs `layer` next; None = the client.

        The history records `history_rows` from `history_pos` when given (a replayed span
        computed more rows than it forwards, in `history_steps`), else `hidden` itself. With
        no live route, waits a grace period for one before telling the client.
        """
        p = self._pending(hidden.shape[0], layer, pos, step, sid, cid, route, skipped, meta)
        self._record(p, hidden, history_rows, history_pos, history_steps)
        return await self._dispatch(p, hidden, prefer=self.next.get(sid))

    def send_nowait(
        self,
        hidden: torch.Tensor,
        *,
        layer: int,
        pos: int,
        step: int,
        sid: str,
        cid: str,
        route: Sequence[wire.RouteHop] = (),
        skipped: Sequence[int] = (),
        meta: Mapping[str, Any] | None = None,
        history_rows: torch.Tensor | None = None,
        history_pos: int | None = None,
        history_steps: Sequence[int] | None = None,
        raw: wire.RawTensor | None = None,
    ) -> str | None:
        """`send` in this call, posted to the outbox, when a live route is known now (the
        usual case). MeshError when there is none right now: nothing was posted or recorded,
        and `send` is the call that waits for one.

        `raw`: `hidden` already in its wire form, so the message is built without torch. The
        history records the rows at the next turn of the loop, after the caller flushed the
        outbox: the next node is waiting for the message, nobody for the history yet."""
        n = hidden.shape[0] if raw is None else raw.shape[0]
        p = self._pending(n, layer, pos, step, sid, cid, route, skipped, meta)
        hop = self._route(layer, p.fields["meta"], self.next.get(sid))
        node = self._emit(p, hidden if raw is None else raw, pos, dict(p.fields["meta"]), hop)
        if not self._unrecorded:
            asyncio.get_running_loop().call_soon(self._record_sent)
        self._unrecorded.append((p, hidden, history_rows, history_pos, history_steps))
        return node

    def _record_sent(self) -> None:
        unrecorded, self._unrecorded = self._unrecorded, []
        for args in unrecorded:
            self._record(*args)

    def _pending(
        self,
        n: int,
        layer: int,
        pos: int,
        step: int,
        sid: str,
        cid: str,
        route: Sequence[wire.RouteHop],
        skipped: Sequence[int],
        meta: Mapping[str, Any] | None,
    ) -> Pending:
        fields = {"cid": cid, "model": self.model, "route": tuple(route), "meta": dict(meta or {})}
        fields["skipped"] = tuple(skipped)
        return Pending(
            mid="", sid=sid, step=step, node="", layer=layer, pos=pos, n=n,
            fields=fields, deadline=0.0,
        )  # fmt: skip

    def _record(
        self,
        p: Pending,
        hidden: torch.Tensor,
        rows: torch.Tensor | None,
        pos: int | None,
        steps: Sequence[int] | None,
    ) -> None:
        start = p.pos if pos is None else pos
        self.history.store(p.sid, start, hidden if rows is None else rows, steps)

    def _route(
        self,
        layer: int,
        meta: Mapping[str, Any],
        prefer: str | None,
        exclude: Collection[str] = (),
    ) -> Hop:
        """The next hop now; MeshError when no live node can take it."""
        allow, never = skip_policy(meta)
        return next_hop(
            self.view.live(self.model), layer, self.num_layers,
            exclude=exclude, prefer=prefer, allow_skip=allow, never_skip=never,
            extra_load=Counter(self.next.values()),
        )  # fmt: skip

    async def _dispatch(
        self,
        p: Pending,
        hidden: torch.Tensor,
        *,
        prefer: str | None,
        replay_from: int | None = None,
    ) -> str | None:
        give_up = time.monotonic() + ROUTE_GRACE
        while True:
            try:
                hop = self._route(p.layer, p.fields["meta"], prefer, p.excluded(self.view))
                break
            except MeshError as e:
                # A node we gave up on for its silence, and not yet stale or offline, may
                # still be only starved: wait for its next beat rather than fail the request.
                live = {s.node_id for s in self.view.live(self.model)}
                if time.monotonic() >= give_up and not p.excluded(self.view) & live:
                    await self.on_error(p.fields["cid"], p.sid, p.mid or "", "no_route", str(e))
                    return None
            await asyncio.sleep(ROUTE_RETRY)
        meta = dict(p.fields["meta"])
        pos = p.pos
        if replay_from is not None:
            # The receiver lost (or never had) this session: send everything it is missing; it
            # rebuilds its cache and forwards only the positions from the original message on.
            rows = self.history.get(p.sid, replay_from, p.pos + p.n)
            if rows is None:
                await self.on_error(
                    p.fields["cid"], p.sid, p.mid, "no_history",
                    f"{self.me}: cannot replay session {p.sid} from position {replay_from}",
                )  # fmt: skip
                return None
            hidden, pos = rows, replay_from
            steps = self.history.steps(p.sid, replay_from, p.pos + p.n)
            meta.update(replay=True, emit_from=p.pos, steps=steps)
        return self._emit(p, hidden, pos, meta, hop)

    def _emit(
        self,
        p: Pending,
        hidden: torch.Tensor | wire.RawTensor,
        pos: int,
        meta: dict[str, Any],
        hop: Hop,
    ) -> str | None:
        """Post `hidden` along `hop`: to its node (kept in custody until acknowledged), or
        to the client when every remaining layer was skipped; the node, or None."""
        skipped = tuple(sorted({*p.fields["skipped"], *hop.skipped}))
        common: dict[str, Any] = dict(
            sid=T.SessionId(p.sid), cid=T.ClientId(p.fields["cid"]), model=self.model,
            step=p.step, route=p.fields["route"], skipped=skipped, meta=meta,
        )  # fmt: skip
        if hop.node_id is None:
            # Every remaining layer was skipped: the client gets the hidden state as it is.
            last = hidden.rows(-1) if isinstance(hidden, wire.RawTensor) else hidden[-1:]
            out: wire.Message = wire.ResultMessage.from_tensor(
                last, layer=self.num_layers, pos=pos + hidden.shape[0] - 1, **common
            )
            self._publish(self.topics.client_result(p.fields["cid"]), out, T.CLIENT_RESULT)
            return None
        msg = wire.ActivationMessage.from_tensor(hidden, layer=hop.enter, pos=pos, **common)
        self.next[p.sid] = hop.node_id
        p.mid, p.node, p.layer = msg.mid, hop.node_id, hop.enter
        p.fields = {**p.fields, "skipped": skipped}
        p.deadline = time.monotonic() + self.custody.ack_timeout
        self.custody.track(p)
        topic = self.topics.node_layer(self.model, hop.enter, hop.node_id)
        self._publish(topic, msg, T.NODE_LAYER)
        return hop.node_id

    def _publish(self, topic: str, msg: wire.Message, spec: T.TopicSpec) -> None:
        # Queued: a failed publish is logged by the outbox, and custody re-sends the message.
        self.outbox.post(topic, wire.encode(msg), spec.qos)

    async def on_ack(self, ack: T.Ack) -> None:
        """Release an acknowledged message; replay to its receiver when it asks for one."""
        p = self.custody.acknowledged(ack.mid)
        if p is None or ack.need_from is None:
            return
        log.info("%s: %s needs session %s replayed from %d", self.me, ack.by, p.sid, ack.need_from)
        await self._dispatch(p, torch.empty(0), prefer=p.node, replay_from=ack.need_from)

    async def tick(self) -> None:
        """Act on messages whose receiver died or never answered."""
        for p, why in self.custody.due(self.view):
            rows = self.history.get(p.sid, p.pos, p.pos + p.n)
            if rows is None:
                continue  # the session was freed meanwhile
            if why == "dead":
                p.failed[p.node] = time.monotonic()
                self.failovers += 1
                heard = self.view.seen.get(p.node)
                silence = (
                    "never heard"
                    if heard is None
                    else (f"last heard {time.monotonic() - heard:.1f} s ago")
                )
                log.warning(
                    "%s: %s is gone (%s); re-sending session %s step %d elsewhere",
                    self.me, p.node, silence, p.sid, p.step,
                )  # fmt: skip
                await self._dispatch(p, rows, prefer=None)
            else:
                await self._dispatch(p, rows, prefer=p.node)


def send_ack(outbox: Outbox, topics: T.Topics, to: str, ack: T.Ack) -> None:
    """Tell the sender `to` that `ack.by` passed its message on (or needs a replay); queued,
    so the acks of one wave to one sender leave as one bundle."""
    outbox.post(topics.ack(to), T.pack_ack(ack), T.ACK.qos)
