"""The client side of the pipeline: tokenizer, embedding and head here, layers on the mesh.

Like Petals' client, prompts and logits never leave the user's device: the client embeds the
tokens, sends hidden states into the mesh at layer 0, and samples from the hidden state that
comes back from the last layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import torch

from jarvis_mqtt import topics as T
from jarvis_mqtt import wire
from jarvis_mqtt.brokers import BrokerAddress
from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.coalesce import Coalescer
from jarvis_mqtt.errors import MeshError, WireError
from jarvis_mqtt.forwarder import Forwarder
from jarvis_mqtt.generate import Generation, TokenEvent
from jarvis_mqtt.membership import MeshView, format_layers
from jarvis_mqtt.mesh_auth import ENV_USERNAME
from jarvis_mqtt.outbox import Outbox
from jarvis_mqtt.runtime import load_client_stages
from jarvis_mqtt.sampling import SamplingParams
from jarvis_mqtt.transport import MeshClient, MeshMessage

log = logging.getLogger("jarvis.client")
CUSTODY_TICK = 0.05  # seconds between checks for messages whose receiver died


async def wait_for_nodes(
    brokers: Sequence[BrokerAddress],
    root: str,
    node_ids: Sequence[str],
    timeout: float,
    pids: Mapping[str, int] | None = None,
) -> None:
    """Return once every node in `node_ids` is online; MeshError on timeout.

    With `pids`, only a status from that process counts: a node restarted under the same id
    may still have its predecessor's retained status on the brokers for a few milliseconds.
    """
    topics = T.Topics(root)
    view = MeshView()
    want = set(node_ids)
    async with MeshClient(list(brokers), client_id=str(T.new_client_id("wait"))) as mesh:
        await mesh.subscribe(topics.all_node_status(), qos=T.NODE_STATUS.qos)
        try:
            async with asyncio.timeout(timeout):
                async for m in mesh.messages():
                    if m.payload:
                        try:
                            view.update(T.unpack_status(m.payload))
                        except WireError:
                            continue
                    up = {
                        s.node_id for s in view.live() if not pids or pids.get(s.node_id) == s.pid
                    }
                    if want <= up:
                        return
        except TimeoutError:
            missing = sorted(want - {s.node_id for s in view.live()})
            raise MeshError(f"nodes not online after {timeout:.0f} s: {missing}") from None


@dataclass
class StepResult:
    """Logits of the last position after one trip through the mesh, and how it went."""

    logits: torch.Tensor
    route: list[dict[str, Any]]
    skipped: list[int]


@dataclass
class SessionRoute:
    """Per session: which node took its first span (its KV cache lives there)."""

    first: str | None = None
    steps: int = 0
    history: list[list[dict[str, Any]]] = field(default_factory=list)


def default_never_skip(model_dir: ModelDir) -> list[int]:
    """The never-skip layers of the model directory's `criticality.json` (`jarvis eval
    sweep`), read as the planner reads them, else the first and the last layer, which the
    JARVIS poster found critical."""
    from jarvis_mqtt.placement_specs import CRITICALITY_FILE, read_criticality

    never, _ = read_criticality(model_dir.path / CRITICALITY_FILE, model_dir.num_layers)
    return sorted(never) if never is not None else [0, model_dir.num_layers - 1]


class RemoteModel:
    """A model whose layers run on the mesh; an async context manager."""

    def __init__(
        self,
        model_dir: ModelDir,
        brokers: Sequence[BrokerAddress],
        *,
        topic_root: str = "jarvis",
        client_id: str | None = None,
        step_timeout: float = 60.0,  # seconds for one trip through all layers
        allow_skip: bool = True,  # route around layers nobody hosts (JARVIS layer skipping)
        never_skip: Sequence[int] | None = None,  # None: criticality.json, else first and last
        dtype: torch.dtype | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.model = model_dir.name
        self.num_layers = model_dir.num_layers
        self.brokers = list(brokers)
        self.topics = T.Topics(topic_root)
        # With credentials the ACL lets a client read only topics named after its username.
        username = os.environ.get(ENV_USERNAME)
        self.client_id = T.ClientId(client_id or username or T.new_client_id("chat"))
        self.step_timeout = step_timeout
        self.allow_skip = allow_skip
        if never_skip is None:
            never_skip = default_never_skip(model_dir)
        self.never_skip = sorted(set(never_skip))
        self.tokenizer = model_dir.tokenizer()
        self.embed, self.head = load_client_stages(model_dir, dtype)
        # Sessions whose results arrive together share one pass of the head over its matrix.
        self._head = Coalescer(self.head, name="head")
        self.view = MeshView()
        self.sessions: dict[str, SessionRoute] = {}
        self._pending: dict[tuple[str, int], asyncio.Future[wire.ResultMessage]] = {}
        self._mesh: MeshClient | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._forwarder: Forwarder | None = None
        self._outbox: Outbox | None = None
        self._view_changed = asyncio.Event()
        self._result_topic = self.topics.client_result(self.client_id)

    @classmethod
    def open(
        cls, model: str, brokers: Sequence[BrokerAddress], models_dir: Path | None = None, **kw: Any
    ) -> RemoteModel:
        """Open by model name (under `models_dir` or the default models root)."""
        md = ModelDir.open(model if models_dir is None else str(models_dir / model))
        return cls(md, brokers, **kw)

    async def __aenter__(self) -> Self:
        # A random suffix: two chats of one user must not take over each other's connection.
        self._mesh = MeshClient(
            self.brokers, client_id=f"jarvis-{self.client_id}-{os.urandom(3).hex()}"
        )
        await self._mesh.__aenter__()
        try:
            await self._mesh.subscribe(self._result_topic)
            await self._mesh.subscribe(self.topics.all_node_status(), qos=T.NODE_STATUS.qos)
            await self._mesh.subscribe(self.topics.ack(self.client_id))
            self._mesh.set_handler(self._take)
            # Sessions stepping together (their results came back together) enter as one bundle.
            self._outbox = Outbox(self._mesh)
            self._forwarder = Forwarder(
                self._outbox, self.topics, self.view, model=self.model,
                num_layers=self.num_layers, me=self.client_id, on_error=self._fail,
            )  # fmt: skip
            self._tg = asyncio.TaskGroup()
            await self._tg.__aenter__()
            self._tasks = [
                self._tg.create_task(self._read(self._mesh), name="client reader"),
                self._tg.create_task(self._custody(self._forwarder), name="client custody"),
            ]
        except BaseException:
            await self._mesh.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.sessions and self._mesh is not None:
            with contextlib.suppress(MeshError):  # else nodes expire them by TTL
                await self.free(list(self.sessions))
        for task in self._tasks:
            task.cancel()
        if self._tg is not None:
            await self._tg.__aexit__(None, None, None)
        if self._outbox is not None:
            await self._outbox.flush()
        if self._mesh is not None:
            await self._mesh.__aexit__(exc_type, exc, tb)
        self._head.close()

    def _take(self, m: MeshMessage) -> bool:
        """The mesh's first look at a message, in its read callback: a result wakes its step
        without a turn of the event loop through `_read`."""
        if m.topic != self._result_topic:
            return False
        for part in self._parts(m):
            self._on_result(part)
        return True

    def _parts(self, m: MeshMessage) -> list[memoryview]:
        """The messages a (bundled) payload carries; none, logged, when the bundle is broken."""
        try:
            return wire.unbundle(m.payload)
        except WireError as e:
            log.warning("broken bundle on %s: %s", m.topic, e)
            return []

    async def _read(self, mesh: MeshClient) -> None:
        async for m in mesh.messages():
            try:
                parsed = self.topics.parse(m.topic)
            except WireError:
                continue
            if isinstance(parsed, T.NodeStatusTopic):
                try:
                    T.fold_status(self.view, parsed, m.payload)
                except WireError as e:
                    log.debug("bad status: %s", e)
                    continue
                self._view_changed.set()
            elif isinstance(parsed, T.ClientResultTopic):
                for part in self._parts(m):
                    self._on_result(part)
            elif isinstance(parsed, T.AckTopic) and self._forwarder is not None:
                for part in self._parts(m):
                    try:
                        await self._forwarder.on_ack(T.unpack_ack(part))
                    except WireError as e:
                        log.warning("bad ack: %s", e)

    async def _custody(self, forwarder: Forwarder) -> None:
        while True:
            await asyncio.sleep(CUSTODY_TICK)
            await forwarder.tick()

    async def _fail(self, cid: str, sid: str, ref: str, code: str, text: str) -> None:
        """The first hop could not be delivered anywhere: fail the step waiting on it."""
        for (s, _), fut in list(self._pending.items()):
            if s == sid and not fut.done():
                fut.set_exception(MeshError(text))

    def _on_result(self, payload: bytes | memoryview) -> None:
        try:
            msg = wire.decode(payload, max_bytes=1 << 30)
        except WireError as e:
            log.warning("undecodable result: %s", e)
            return
        if isinstance(msg, wire.ErrorMessage):
            # An error names the session; fail whichever step of it is waiting.
            for (sid, _), fut in list(self._pending.items()):
                if sid == msg.sid and not fut.done():
                    fut.set_exception(MeshError(msg.text))
            if msg.sid is None:
                log.warning("mesh error: %s", msg.text)
            return
        if isinstance(msg, wire.ResultMessage):
            waiting = self._pending.get((msg.sid, msg.step))
            if waiting is not None and not waiting.done():
                waiting.set_result(msg)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until live nodes cover every layer; MeshError naming the missing ones."""
        try:
            async with asyncio.timeout(timeout):
                while missing := self.view.missing_layers(self.model, self.num_layers):
                    self._view_changed.clear()
                    await self._view_changed.wait()
        except TimeoutError:
            raise MeshError(
                f"model {self.model}: no live node hosts layers {format_layers(missing)} "
                f"after {timeout:.0f} s (is the mesh up? `jarvis mesh status`)"
            ) from None

    async def step(self, session: str, tokens: Sequence[int], start: int) -> StepResult:
        """Feed `tokens` at positions from `start` through every layer; logits of the last."""
        assert self._mesh is not None, "use `async with RemoteModel(...)`"
        route = self.sessions.setdefault(session, SessionRoute())
        assert self._forwarder is not None
        hidden = self.embed(torch.tensor(list(tokens)))
        key = (session, route.steps)
        fut: asyncio.Future[wire.ResultMessage] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            send: dict[str, Any] = dict(
                layer=0, pos=start, step=route.steps, sid=session, cid=self.client_id,
                meta={"allow_skip": self.allow_skip, "never_skip": self.never_skip},
            )  # fmt: skip
            try:
                # Published at the next loop turn: sessions stepping together enter together.
                route.first = self._forwarder.send_nowait(hidden, **send)
            except MeshError:  # no live route right now: wait a grace period for one
                route.first = await self._forwarder.send(hidden, **send)
            async with asyncio.timeout(self.step_timeout):
                result = await fut
        except TimeoutError:
            raise MeshError(
                f"no result for session {session} step {route.steps} within "
                f"{self.step_timeout:.0f} s"
            ) from None
        finally:
            self._pending.pop(key, None)
        route.steps += 1
        replayed = result.meta.get("replayed") or []
        hops: list[dict[str, Any]] = [
            {
                "node": h.node,
                "start": h.start,
                "end": h.end,
                "ms": round((h.t_out - h.t_in) * 1e3, 3),
                "replay": h.node in replayed,  # rebuilt its cache from a replay for this token
            }
            for h in result.route
        ]
        route.history.append(hops)
        # Off the event loop: a large vocabulary's head (Gemma 3: 262k rows) takes long enough
        # to starve the heartbeats and acks this client must keep reading.
        hidden_out = result.to_tensor().to(self.embed_dtype)
        logits = (await self._head(hidden_out[-1:]))[-1]
        return StepResult(logits, hops, list(result.skipped))

    @property
    def embed_dtype(self) -> torch.dtype:
        """The dtype hidden states travel in."""
        return self.head.norm.weight.dtype

    async def free(self, sessions: Sequence[str]) -> None:
        """Tell every node to drop these sessions' caches."""
        assert self._mesh is not None
        for sid in sessions:
            self.sessions.pop(sid, None)
            if self._forwarder is not None:
                self._forwarder.forget(sid)
        await self._mesh.publish(
            self.topics.session_free(self.model), T.pack_session_free(map(T.SessionId, sessions))
        )

    async def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, *, session: str | None = None
    ) -> AsyncIterator[TokenEvent]:
        """Stream the reply to `prompt_ids`; the session is freed at the end."""
        sid = session or T.new_session_id()
        gen = Generation(self.tokenizer, params, list(prompt_ids))
        t0 = time.perf_counter()
        try:
            res = await self.step(sid, gen.prompt_ids, 0)
            while True:
                tok = gen.pick(res.logits)
                text = gen.accept(tok)
                now = time.perf_counter()
                yield TokenEvent(tok, text, now - t0, route=res.route, skipped=res.skipped)
                t0 = now
                if gen.done:
                    return
                pos = len(gen.prompt_ids) + len(gen.generated) - 1
                res = await self.step(sid, [tok], pos)
        finally:
            if session is None and sid in self.sessions:
                await self.free([sid])
