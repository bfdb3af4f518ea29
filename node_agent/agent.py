"""The node agent: hosts decoder layers `[start, end)` of one model on the mesh.

It subscribes to the layer topics of its span addressed to it, packs whatever activations are
waiting into one forward step (`batch.py`), run off the event loop on one worker thread that
owns the KV caches, and publishes each result to the next live node, or back to the client when
its span is the last: a wave's results for one receiver leave as one bundle (`outbox.py`).
On the hot path nothing waits for a turn of the event loop: activations are accepted in the
mesh's read callback, which starts the forward, and the forward's completion callback passes
the results on. A retained status doubles as heartbeat; a retained last will marks it offline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from jarvis_mqtt import topics as T
from jarvis_mqtt import wire
from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.errors import CacheMissError, JarvisError, MeshError, WireError
from jarvis_mqtt.forwarder import Forwarder, send_ack
from jarvis_mqtt.heap import trim_heap
from jarvis_mqtt.membership import MeshView, NodeStatus
from jarvis_mqtt.model import dtype_from_name
from jarvis_mqtt.outbox import Outbox
from jarvis_mqtt.runtime import LayerSpan
from jarvis_mqtt.shards import FileServer
from jarvis_mqtt.transport import LastWill, MeshClient, MeshMessage
from node_agent.batch import Outcome, Work, forward, replay_steps, take_batch
from node_agent.config import NodeConfig

log = logging.getLogger("jarvis.node")
HEARTBEAT_LATE = 0.5  # seconds: a heartbeat this late means the event loop was blocked
ACTIVE_FOR = 1.0  # seconds: a session that sent nothing for this long is not waited for
CUSTODY_TICK = 0.05  # seconds between checks for messages whose receiver died
MAX_SENDING = 4  # computed waves being passed on at once; the next forward waits beyond that


@dataclass
class Load:
    """Snapshot of the worker's state, published in the heartbeat."""

    sessions: int = 0
    kv_bytes: int = 0
    steps: int = 0
    tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class NodeAgent:
    """One node of the mesh; `await NodeAgent(cfg).run()` serves until `stop` is set."""

    def __init__(self, cfg: NodeConfig, *, stop: asyncio.Event | None = None) -> None:
        self.cfg = cfg
        self.stop = stop or asyncio.Event()
        self.topics = T.Topics(cfg.topic_root)
        self.view = MeshView()
        self.load = Load()
        self.ready = asyncio.Event()
        self._inbox: collections.deque[Work] = collections.deque()
        self._gather_until: float | None = None  # loop time a wave waits for stragglers until
        self._gather_timer: asyncio.TimerHandle | None = None
        self._kick_soon: asyncio.Handle | None = None  # a `_kick` at the next loop turn
        self._parse = functools.lru_cache(maxsize=4096)(self.topics.parse)
        self._forward_s = 0.0  # moving average of a forward's duration, seconds
        # One thread owns the span (weights and KV caches): forwards, frees and expiry queue up.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"span-{cfg.node_id}")
        self._forwarder: Forwarder | None = None  # set once the mesh is up
        self._draining = False  # leaving: accept nothing new
        self._busy = False  # a batch is being computed
        self._sending: set[asyncio.Task[None]] = set()  # results waiting for a route
        self._replies: set[asyncio.Task[None]] = set()  # refusals being sent to clients
        self._recent: dict[str, float] = {}  # session -> when its last message arrived
        self._span: LayerSpan | None = None
        self._mesh: MeshClient | None = None
        self._outbox: Outbox | None = None  # results, onward activations and acks, bundled
        self._num_layers = 0
        self._hidden = 0
        self._files: FileServer | None = None
        self.shard_bytes = 0  # bytes of its layers' files, once loaded

    @property
    def num_layers(self) -> int:
        """Layers of the model served (0 until loaded)."""
        return self._num_layers

    # -- life cycle ----------------------------------------------------------------------------

    def status(self, online: bool = True) -> NodeStatus:
        """This node's status record."""
        cfg, span = self.cfg, self._span
        return NodeStatus(
            node_id=cfg.node_id,
            model=cfg.model,
            start=cfg.start,
            end=cfg.end,
            online=online,
            time=time.time(),
            host=socket.gethostname(),
            pid=os.getpid(),
            capacity={
                "kv_budget_bytes": cfg.kv_budget_bytes,
                "max_seq_len": span.max_seq_len if span else cfg.max_seq_len,
                "cores": os.cpu_count() or 1,
                "threads": torch.get_num_threads(),
            },
            load={
                "sessions": self.load.sessions,
                "kv_bytes": self.load.kv_bytes,
                "queue": len(self._inbox),
                "steps": self.load.steps,
                "tokens": self.load.tokens,
            },
        )

    async def run(self) -> None:
        """Load the layers, join the mesh, serve until `stop`, then leave cleanly."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        md = ModelDir.open(cfg.model if cfg.models_dir is None else str(cfg.models_dir / cfg.model))
        if not 0 <= cfg.start < cfg.end <= md.num_layers:
            raise MeshError(f"layers [{cfg.start}, {cfg.end}) not in a {md.num_layers}-layer model")
        self._num_layers = md.num_layers
        self._hidden = int(md.config["hidden_size"])
        self._files = FileServer(md, name=cfg.node_id)
        self.shard_bytes = md.shard_bytes(cfg.start, cfg.end, include_stage=False)
        dtype = dtype_from_name(cfg.dtype) if cfg.dtype else None
        t0 = time.perf_counter()
        self._span = await loop.run_in_executor(
            self._worker,
            lambda: LayerSpan.load(
                md,
                cfg.start,
                cfg.end,
                dtype=dtype,
                max_seq_len=cfg.max_seq_len,
                kv_budget_bytes=cfg.kv_budget_bytes,
                session_ttl=cfg.session_ttl,
            ),
        )
        span = self._span
        threads = await loop.run_in_executor(self._worker, span.decode_threads)  # before serving
        log.info(
            "%s: loaded layers [%d, %d) of %s in %.2f s; decode steps on %d thread(s)",
            cfg.node_id, cfg.start, cfg.end, cfg.model, time.perf_counter() - t0, threads,
        )  # fmt: skip
        status_topic = self.topics.node_status(cfg.node_id)
        will = LastWill(status_topic, T.pack_status(self.status(online=False)), retain=True)
        mesh = MeshClient(
            list(cfg.brokers),
            client_id=f"jarvis-{cfg.node_id}",
            keepalive=cfg.keepalive,
            will=will,
            max_payload=cfg.max_payload_bytes,
        )
        async with mesh, Outbox(mesh) as outbox:
            self._mesh, self._outbox = mesh, outbox
            for layer in range(cfg.start, cfg.end):
                await mesh.subscribe(self.topics.node_layer(cfg.model, layer, cfg.node_id))
            self._forwarder = Forwarder(
                outbox, self.topics, self.view, model=cfg.model, num_layers=md.num_layers,
                me=cfg.node_id, on_error=self._reject_str,
            )  # fmt: skip
            await mesh.subscribe(self.topics.ack(cfg.node_id))
            await mesh.subscribe(self.topics.session_free(cfg.model))
            await mesh.subscribe(self.topics.all_node_status(), qos=T.NODE_STATUS.qos)
            await mesh.subscribe(self.topics.file_get(cfg.node_id))
            mesh.set_handler(self._take)
            await mesh.publish(status_topic, T.pack_status(self.status()), retain=True)
            self.ready.set()
            log.info("%s: serving on %s", cfg.node_id, ", ".join(map(str, cfg.brokers)))
            try:
                async with asyncio.TaskGroup() as tg:
                    tasks = [
                        tg.create_task(self._receive(mesh), name="receive"),
                        tg.create_task(self._heartbeat(mesh, status_topic), name="heartbeat"),
                        tg.create_task(self._expire(), name="expire"),
                        tg.create_task(self._custody(), name="custody"),
                    ]
                    await self.stop.wait()
                    await self._drain(mesh, status_topic)
                    for t in tasks:
                        t.cancel()
            finally:
                # A clean leave clears the retained status instead of leaving "offline" behind.
                mesh.set_handler(None)
                try:
                    async with asyncio.timeout(cfg.graceful_timeout):
                        await mesh.publish(status_topic, b"", retain=True)
                except (TimeoutError, JarvisError) as e:
                    log.warning("%s: could not clear status: %s", cfg.node_id, e)
        self._worker.shutdown(wait=False, cancel_futures=True)
        log.info("%s: stopped", cfg.node_id)

    async def _drain(self, mesh: MeshClient, status_topic: str) -> None:
        """Leave without breaking the chain of custody.

        Clearing the status first makes senders re-send what they gave us and we have not
        passed on; what we did pass on stays ours until the next node acknowledges it, so we
        wait for those acks (re-sending elsewhere if it dies) before going, within bounds.
        """
        self._draining = True
        self._inbox.clear()  # not acknowledged: their senders re-send them elsewhere
        with contextlib.suppress(JarvisError):
            await mesh.publish(status_topic, b"", retain=True)
        forwarder = self._forwarder
        try:
            async with asyncio.timeout(self.cfg.graceful_timeout):
                # Polled: custody changes in several places; this runs once, at shutdown.
                while self._busy or self._sending or (forwarder and forwarder.custody.pending):  # noqa: ASYNC110
                    await asyncio.sleep(CUSTODY_TICK)
        except TimeoutError:
            log.warning("%s: left with messages not yet acknowledged", self.cfg.node_id)

    async def _heartbeat(self, mesh: MeshClient, topic: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.cfg.heartbeat
            await asyncio.sleep(self.cfg.heartbeat)
            if (late := loop.time() - due) > HEARTBEAT_LATE:
                log.warning("%s: heartbeat %.1f s late: event loop blocked", self.cfg.node_id, late)
            if self._draining:
                return
            t0 = loop.time()
            try:
                status = T.pack_status(self.status())
                await mesh.publish(topic, status, qos=T.NODE_STATUS.qos, retain=True)
            except JarvisError as e:  # every broker down: keep trying, the links reconnect
                log.warning("%s: heartbeat not sent: %s", self.cfg.node_id, e)
            if loop.time() - t0 > HEARTBEAT_LATE:
                log.warning("%s: heartbeat publish took %.1f s", self.cfg.node_id, loop.time() - t0)

    async def _custody(self) -> None:
        while True:
            await asyncio.sleep(CUSTODY_TICK)
            assert self._forwarder is not None
            await self._forwarder.tick()

    async def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(30.0, self.cfg.session_ttl / 4))
            for sid in await loop.run_in_executor(self._worker, self._expire_sessions):
                if self._forwarder is not None:
                    self._forwarder.forget(sid)
                log.info("%s: session %s expired", self.cfg.node_id, sid)

    # -- receiving -----------------------------------------------------------------------------

    async def _receive(self, mesh: MeshClient) -> None:
        async for m in mesh.messages():
            try:
                parsed = self._parse(m.topic)
            except WireError as e:
                log.warning("%s: ignored message: %s", self.cfg.node_id, e)
                continue
            if isinstance(parsed, T.NodeStatusTopic):
                self._on_status(parsed, m)
            elif isinstance(parsed, T.SessionFreeTopic):
                await self._on_free(m)
            elif isinstance(parsed, T.LayerTopic):
                self._accept_all(parsed, m)
            elif isinstance(parsed, T.AckTopic) and self._forwarder is not None:
                for part in self._parts(m):
                    try:
                        ack = T.unpack_ack(part)
                    except WireError as e:
                        log.warning("%s: bad ack: %s", self.cfg.node_id, e)
                        continue
                    await self._forwarder.on_ack(ack)
            elif isinstance(parsed, T.FileGetTopic):
                assert self._files is not None
                await self._files.offer(mesh, self.topics, m.payload)

    def _parts(self, m: MeshMessage) -> list[memoryview]:
        """The messages a (bundled) payload carries; none, logged, when the bundle is broken."""
        try:
            return wire.unbundle(m.payload)
        except WireError as e:
            log.warning("%s: refused a bundle on %s: %s", self.cfg.node_id, m.topic, e)
            return []

    def _on_status(self, parsed: T.NodeStatusTopic, m: MeshMessage) -> None:
        try:
            T.fold_status(self.view, parsed, m.payload)
        except WireError as e:
            log.warning("%s: bad status on %s: %s", self.cfg.node_id, m.topic, e)

    async def _on_free(self, m: MeshMessage) -> None:
        try:
            sids = T.unpack_session_free(m.payload)
        except WireError as e:
            log.warning("%s: bad session-free message: %s", self.cfg.node_id, e)
            return
        span = self._span
        assert span is not None
        for sid in sids:
            self._recent.pop(sid, None)
            if self._forwarder is not None:
                self._forwarder.forget(sid)
        loop = asyncio.get_running_loop()

        def free() -> None:
            if any([span.free(s) for s in sids]):
                trim_heap()  # the caches' memory back to the system, not kept by malloc
            self._measure()

        await loop.run_in_executor(self._worker, free)

    def _take(self, m: MeshMessage) -> bool:
        """The mesh's first look at a message, in its read callback: activations are accepted
        here, and an idle node starts their forward in this same call, no turn of the event
        loop in between. Anything else goes on to `_receive`."""
        try:
            parsed = self._parse(m.topic)
        except WireError:
            return False  # `_receive` logs it
        if not isinstance(parsed, T.LayerTopic):
            return False
        self._accept_all(parsed, m)
        return True

    def _accept_all(self, parsed: T.LayerTopic, m: MeshMessage) -> None:
        """Queue the activations a (bundled) message carries, then start a forward if one can
        start: at once for sessions already stepping here, one loop turn later when one is
        new, so that the sessions of a burst arriving together start together."""
        fresh = False
        for part in self._parts(m):
            fresh |= self._accept(parsed, part)
        if not fresh:
            self._kick()
        elif self._kick_soon is None:
            self._kick_soon = asyncio.get_running_loop().call_soon(self._kick)

    def _accept(self, parsed: T.LayerTopic, payload: memoryview) -> bool:
        """Queue a valid activation, True if its session is new here; refuse the rest."""
        cfg = self.cfg
        try:
            msg = wire.decode(payload, max_bytes=cfg.max_payload_bytes)
        except wire.WireDecodeError as e:
            self._spawn(self._reject(e.cid, e.sid, e.mid, "bad_message", str(e)), "reject")
            return False
        if not isinstance(msg, wire.ActivationMessage):
            self._spawn(
                self._reject(msg.cid, msg.sid, msg.mid, "bad_message", "expected an activation"),
                "reject",
            )
            return False
        why = self._invalid(msg, parsed)
        if why is not None:
            self._spawn(self._reject(msg.cid, msg.sid, msg.mid, "bad_message", why), "reject")
            return False
        span = self._span
        assert span is not None
        if self._draining:
            return False  # not acknowledged: the sender re-sends it to a node that stays
        hidden = msg.to_tensor()  # (tokens, hidden), `_invalid` saw to it
        if hidden.dtype != span.dtype:
            hidden = hidden.to(span.dtype)
        self._inbox.append(Work(msg, hidden, time.time(), replay_steps(msg)))
        fresh = msg.sid not in self._recent
        self._recent[msg.sid] = time.monotonic()
        return fresh

    def _invalid(self, msg: wire.ActivationMessage, parsed: T.LayerTopic) -> str | None:
        cfg = self.cfg
        if msg.model != cfg.model or parsed.model != cfg.model:
            return f"model {msg.model!r} is not served by {cfg.node_id} ({cfg.model})"
        if parsed.node_id not in (None, cfg.node_id):
            return f"message for node {parsed.node_id} reached {cfg.node_id}"
        if not cfg.start <= msg.layer < cfg.end or msg.layer != parsed.layer:
            return (
                f"layer {msg.layer} is not hosted by {cfg.node_id} "
                f"(layers [{cfg.start}, {cfg.end}))"
            )
        if len(msg.shape) != 2 or msg.shape[1] != self._hidden:
            return f"shape {list(msg.shape)} is not (tokens, {self._hidden})"
        return None

    async def _reject_str(self, cid: str, sid: str, ref: str, code: str, text: str) -> None:
        await self._reject(cid or None, sid or None, ref or None, code, text)

    async def _reject(
        self,
        cid: str | None,
        sid: str | None,
        ref: str | None,
        code: str,
        text: str,
    ) -> None:
        """Log a refused message once and tell its client, when it named one."""
        log.warning("%s: refused message %s from %s: %s", self.cfg.node_id, ref, cid, text)
        if cid is None or self._mesh is None:
            return
        err = wire.ErrorMessage(
            code=code,
            text=f"{self.cfg.node_id}: {text}",
            cid=T.ClientId(cid),
            sid=None if sid is None else T.SessionId(sid),
            ref=None if ref is None else T.MessageId(ref),
            meta={"node": self.cfg.node_id},
        )
        try:
            await self._mesh.publish(self.topics.client_result(cid), wire.encode(err))
        except JarvisError as e:
            log.warning("%s: could not send error to %s: %s", self.cfg.node_id, cid, e)

    # -- computing -----------------------------------------------------------------------------

    def _forward(self, batch: Sequence[Work]) -> list[Outcome]:
        """Runs on the worker thread."""
        assert self._span is not None
        outcomes = forward(self._span, batch)
        self._measure(steps=1, tokens=sum(w.msg.n_tokens for w in batch))
        return outcomes

    def _expire_sessions(self) -> list[str]:
        """Worker thread: free sessions idle past their TTL."""
        assert self._span is not None
        gone = self._span.expire()
        if gone:
            trim_heap()
        self._measure()
        return gone

    def _measure(self, steps: int = 0, tokens: int = 0) -> None:
        """Worker thread: refresh the load snapshot the heartbeat publishes."""
        span = self._span
        assert span is not None
        self.load = Load(
            sessions=len(span.sessions),
            kv_bytes=span.kv_bytes,
            steps=self.load.steps + steps,
            tokens=self.load.tokens + tokens,
        )

    def _kick(self) -> None:
        """Start the next forward if the worker is free and a wave is ready. Called when an
        activation is accepted, when a forward ends, and when a wave's wait is over."""
        self._kick_soon = None
        if self._busy or not self._inbox or self._draining or len(self._sending) >= MAX_SENDING:
            return
        if not self._wave_ready():
            return
        if self._gather_timer is not None:
            self._gather_timer.cancel()
        self._gather_until = self._gather_timer = None
        batch, self._inbox = take_batch(self._inbox, self.cfg.max_batch_tokens)
        self._busy = True
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        def done(f: Future[list[Outcome]]) -> None:  # on the worker thread
            with contextlib.suppress(RuntimeError):  # the loop closed: the node has stopped
                loop.call_soon_threadsafe(self._computed, batch, f, t0)

        self._worker.submit(self._forward, batch).add_done_callback(done)

    def _wave_ready(self) -> bool:
        """With several sessions active, a wave waits until each has a step waiting: k
        sessions in one forward share one pass over the weights (what that saves depends on
        the CPU's small-matrix kernels), and once together they stay together down the
        pipeline. A straggler is waited for at most as long as a forward takes (`batch_wait`
        at most): longer, and waiting would cost more than the forward it saves."""
        now = time.monotonic()
        for sid in [s for s, t in self._recent.items() if now - t > ACTIVE_FOR]:
            del self._recent[sid]
        if self.cfg.batch_wait <= 0:
            return True
        active = len(self._recent)
        if active <= 1 or len({w.msg.sid for w in self._inbox}) >= active:
            return True
        if any(w.replay_steps is not None for w in self._inbox):
            return True  # a replay runs alone anyway
        loop = asyncio.get_running_loop()
        if self._gather_until is None:
            self._gather_until = loop.time() + min(self.cfg.batch_wait, self._forward_s)
            self._gather_timer = loop.call_at(self._gather_until, self._kick)
        return loop.time() >= self._gather_until

    def _computed(self, batch: list[Work], f: Future[list[Outcome]], t0: float) -> None:
        """A forward ended (on the loop thread): pass its results on, start the next one."""
        self._busy = False
        try:
            outcomes = f.result()
        except Exception as e:  # a bug, not a bad session: answer and keep serving
            log.exception("%s: a forward step failed", self.cfg.node_id)
            for w in batch:
                m, why = w.msg, f"forward step failed: {e}"
                self._spawn(self._reject(m.cid, m.sid, m.mid, "internal", why), "reject")
            outcomes = []
        if outcomes and all(w.msg.n_tokens == 1 for w in batch):  # what a straggler would cost
            took = asyncio.get_running_loop().time() - t0
            self._forward_s = 0.8 * self._forward_s + 0.2 * took if self._forward_s else took
        self._pass_on(outcomes)
        self._kick()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a send that has to wait (for a route, for a broker) in the background. Results
        waiting for a route hold up the next forward beyond `MAX_SENDING` of them."""
        task = asyncio.create_task(coro, name=name)
        (self._sending if name == "send" else self._replies).add(task)
        task.add_done_callback(self._spawned_done)

    def _spawned_done(self, task: asyncio.Task[None]) -> None:
        self._replies.discard(task)
        if task in self._sending:
            self._sending.discard(task)
            self._kick()  # a wave may have waited for sends to drain
        if not task.cancelled() and (e := task.exception()) is not None:
            # Custody re-sends what was not passed on; the node keeps serving.
            log.error("%s: %s failed", self.cfg.node_id, task.get_name(), exc_info=e)

    def _pass_on(self, outcomes: list[Outcome]) -> None:
        """Pass on a computed wave, in this call unless a route or a broker must be waited
        for: its activations for one node (and its acks to one sender) leave as one bundle,
        the activations and results first, as the next node waits for them."""
        outbox = self._outbox
        assert outbox is not None
        acks: list[tuple[str, T.Ack, asyncio.Future[bool] | None]] = []
        for o in outcomes:
            try:
                self._pass_one(o, acks)
            except Exception:  # custody re-sends it; the node keeps serving
                log.exception("%s: passing on %s failed", self.cfg.node_id, o.work.msg.mid)
        outbox.flush_now()
        for upstream, ack, sent in acks:
            if sent is None or (sent.done() and sent.result()):
                send_ack(outbox, self.topics, upstream, ack)
            elif not sent.done():  # left to the flusher: acknowledge once a broker took it
                sent.add_done_callback(functools.partial(self._ack_if_sent, upstream, ack))
        outbox.flush_now()

    def _ack_if_sent(self, upstream: str, ack: T.Ack, sent: asyncio.Future[bool]) -> None:
        # No ack for what no broker took: the sender still holds it and will re-send.
        if self._outbox is not None and not sent.cancelled() and sent.result():
            send_ack(self._outbox, self.topics, upstream, ack)

    def _pass_one(
        self, o: Outcome, acks: list[tuple[str, T.Ack, asyncio.Future[bool] | None]]
    ) -> None:
        msg = o.work.msg
        cfg = self.cfg
        me = T.NodeId(cfg.node_id)
        upstream = msg.route[-1].node if msg.route else msg.cid
        if isinstance(o.error, CacheMissError) and not msg.meta.get("replay"):
            # A replica taking over, or a node that restarted: ask the sender for a replay.
            log.info("%s: session %s needs a replay from %d", cfg.node_id, msg.sid, o.error.have)
            acks.append((upstream, T.Ack(msg.mid, me, need_from=o.error.have), None))
            return
        if o.error is not None or o.hidden is None:
            self._spawn(self._reject(msg.cid, msg.sid, msg.mid, "session", str(o.error)), "reject")
            return
        hop = wire.RouteHop(me, msg.layer, cfg.end, o.work.t_in, time.time())
        route = (*msg.route, hop)
        meta = dict(msg.meta)
        # What is sent is built from `raw` (no torch on the loop); `hidden` goes to the history.
        hidden, raw, pos = o.hidden, o.raw or wire.RawTensor.of(o.hidden), msg.pos
        emit_from = meta.pop("emit_from", None)
        if meta.pop("replay", False) and isinstance(emit_from, int):
            # Rebuilt the cache from a replay: pass on only what the original message carried.
            meta["replayed"] = [*meta.get("replayed", []), cfg.node_id]
            cut, pos = emit_from - msg.pos, emit_from
            hidden, raw = o.hidden[cut:], raw.rows(cut)
        ack = T.Ack(msg.mid, me)
        if cfg.end == self._num_layers:
            # The client needs the last position only: it samples from it.
            out = wire.ResultMessage.from_tensor(
                raw.rows(-1), sid=msg.sid, cid=msg.cid, model=msg.model, step=msg.step,
                pos=pos + raw.shape[0] - 1, layer=self._num_layers, route=route,
                skipped=msg.skipped, meta=meta,
            )  # fmt: skip
            assert self._outbox is not None
            topic = self.topics.client_result(msg.cid)
            sent = self._outbox.post(topic, wire.encode(out), T.CLIENT_RESULT.qos)
            acks.append((upstream, ack, sent))
            return
        assert self._forwarder is not None
        send: dict[str, Any] = dict(
            layer=cfg.end, pos=pos, step=msg.step, sid=msg.sid, cid=msg.cid, route=route,
            skipped=msg.skipped, meta=meta, history_rows=o.hidden, history_pos=msg.pos,
            history_steps=o.work.replay_steps,
        )  # fmt: skip
        try:
            self._forwarder.send_nowait(hidden, raw=raw, **send)
        except MeshError:  # no live route right now: wait for one in the background
            self._spawn(self._send_later(hidden, send, upstream, ack), "send")
        else:
            acks.append((upstream, ack, None))

    async def _send_later(
        self, hidden: torch.Tensor, send: dict[str, Any], upstream: str, ack: T.Ack
    ) -> None:
        assert self._forwarder is not None and self._outbox is not None
        await self._forwarder.send(hidden, **send)
        send_ack(self._outbox, self.topics, upstream, ack)
