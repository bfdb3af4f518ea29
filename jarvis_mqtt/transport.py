"""One logical MQTT connection over every broker of the mesh.

`MeshClient` keeps a connection to each broker (reconnected forever, with jittered backoff),
publishes every message to all connected brokers and merges what they deliver, dropping the
copies by message id. There are no bridges: losing a broker loses nothing while another one is
up. Messages of one publisher keep their order on each broker, not across brokers.

With a deployed mesh every connection authenticates (`mesh_auth.MeshAuth`: username, password,
TLS with the mesh's own CA); what each user may read and write is the brokers' ACL (`security.py`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import aiomqtt
import paho.mqtt.client as paho_mqtt

from jarvis_mqtt.brokers import BrokerAddress
from jarvis_mqtt.dedup import DedupKey, RecentKeys, default_dedup_key
from jarvis_mqtt.errors import ConfigError, MeshError, WireError
from jarvis_mqtt.mesh_auth import MeshAuth

log = logging.getLogger(__name__)

MAX_MQTT_PAYLOAD = 268_435_455 - 65_536  # MQTT's remaining-length limit, less header room
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_CHECKED_TOPICS = 4096  # topic names remembered as valid (per-layer and per-client topics)
_RECANCEL_AFTER = 1.0  # seconds a link may take to stop before it is cancelled again


@dataclass(frozen=True)
class LastWill:
    """What every broker publishes for this client when its connection dies uncleanly."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class MeshMessage:
    """An incoming message, as first delivered by `broker`."""

    topic: str
    payload: bytes
    retain: bool
    qos: int
    broker: BrokerAddress


@dataclass
class MeshCounters:
    """Totals since the client started, for stats."""

    received: int = 0  # messages delivered by any broker, duplicates included
    duplicates: int = 0  # of those, dropped as already seen
    published: int = 0  # publish() calls that reached at least one broker
    connects: int = 0  # successful broker connections, reconnects included


class MeshClient:
    """Connections to all brokers of a mesh behaving as one client; an async context manager.

    Entering waits until at least one broker is connected (MeshError after
    `connect_timeout`). A clean exit disconnects gracefully, so brokers send no last will.
    """

    def __init__(
        self,
        brokers: Sequence[BrokerAddress],
        *,
        client_id: str,
        clean_session: bool = True,
        keepalive: int = 10,  # seconds; a dead peer is noticed after 1.5x this
        will: LastWill | None = None,
        dedup_key: DedupKey = default_dedup_key,
        dedup_window: int = 65536,  # keys remembered to recognise duplicates
        connect_timeout: float = 10.0,  # seconds to wait for the first broker on enter
        publish_timeout: float = 5.0,  # seconds to wait for one broker's acknowledgement
        max_payload: int = 64 << 20,  # bytes; larger publishes raise WireError
        max_inflight: int = 100,  # unacknowledged QoS 1 messages per broker
        backoff: tuple[float, float] = (0.05, 2.0),  # seconds: first and longest retry delay
        username: str | None = None,  # None: $JARVIS_MQTT_USERNAME, else anonymous
        password: str | None = None,  # None: $JARVIS_MQTT_PASSWORD
        tls_ca: str | Path | None = None,  # mesh CA (PEM); None: $JARVIS_MQTT_TLS_CA, else no TLS
        tls_cert: str | Path | None = None,  # client certificate; None: $JARVIS_MQTT_TLS_CERT
        tls_key: str | Path | None = None,  # its key; None: $JARVIS_MQTT_TLS_KEY
        tls_insecure: bool = False,  # skip the broker host name check (never in production)
    ) -> None:
        if not brokers:
            raise MeshError("no broker addresses given")
        if not 0 < max_payload <= MAX_MQTT_PAYLOAD:
            raise MeshError(f"max_payload must be in 1..{MAX_MQTT_PAYLOAD} bytes")
        self.client_id = client_id
        self._clean_session = clean_session
        self._keepalive = keepalive
        self._will = will
        self._dedup_key = dedup_key
        self._seen = RecentKeys(dedup_window)
        self._connect_timeout = connect_timeout
        self._publish_timeout = publish_timeout
        self._max_payload = max_payload
        self._max_inflight = max_inflight
        self._backoff = backoff
        self.auth = MeshAuth.resolve(
            username=username,
            password=password,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_insecure=tls_insecure,
        )
        self._tls = self.auth.ssl_context()  # one context shared by every connection
        self._links = [_Link(self, addr) for addr in dict.fromkeys(brokers)]
        self._subs: dict[str, int] = {}  # topic filter -> qos, re-applied on every connect
        self._inbox: asyncio.Queue[MeshMessage | None] = asyncio.Queue()
        self._handler: Callable[[MeshMessage], bool] | None = None
        self._checked: set[str] = set()  # topic names already validated for publishing
        self._any_up = asyncio.Event()
        self._changed = asyncio.Event()  # replaced by a fresh one on every link change
        self._tg: asyncio.TaskGroup | None = None
        self._closed = False
        self.counters = MeshCounters()

    async def __aenter__(self) -> Self:
        if self._tg is not None or self._closed:
            raise MeshError("a MeshClient can be entered only once")
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        for link in self._links:
            link.task = self._tg.create_task(link.run(), name=f"mesh link {link.address}")
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._any_up.wait()
        except BaseException as e:
            # Timed out or cancelled: __aexit__ will not run, so stop the links here.
            why = "; ".join(f"{k.address}: {k.last_error or 'no answer'}" for k in self._links)
            await self._close()
            if isinstance(e, TimeoutError):
                raise MeshError(
                    f"no broker reachable within {self._connect_timeout:.1f} s ({why})"
                ) from None
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        self._closed = True
        self._inbox.put_nowait(None)  # ends messages()
        tasks = [link.task for link in self._links if link.task is not None]
        for task in tasks:
            task.cancel()
        # A cancellation landing just as a broker's CONNACK arrives is swallowed inside aiomqtt's
        # connect (asyncio.wait_for before Python 3.12) and the link would serve on forever:
        # cancel again until every link has stopped.
        while pending := [t for t in tasks if not t.done()]:
            await asyncio.wait(pending, timeout=_RECANCEL_AFTER)
            for task in pending:
                if not task.done():
                    task.cancel()
        assert self._tg is not None
        # Links only stop by cancellation; anything else they raise is a bug and surfaces here.
        await self._tg.__aexit__(None, None, None)

    @property
    def any_connected(self) -> bool:
        """Whether at least one broker is connected now."""
        return self._any_up.is_set()

    def connected_brokers(self) -> list[BrokerAddress]:
        """Brokers connected right now."""
        return [link.address for link in self._links if link.client is not None]

    def tcp_nodelay(self) -> dict[BrokerAddress, bool]:
        """Whether TCP_NODELAY is on for each connected broker's socket."""
        return {link.address: link.nodelay() for link in self._links if link.client is not None}

    async def wait_connected(self, count: int = 1) -> None:
        """Wait until `count` brokers are connected (bound it with `asyncio.timeout`)."""
        while len(self.connected_brokers()) < count:
            await self._changed.wait()

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe on every broker, now and after every reconnect; ConfigError on a bad filter."""
        _check_topic(aiomqtt.Wildcard, topic_filter, qos)
        self._subs[topic_filter] = qos
        links = [link for link in self._links if link.client is not None]
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(link.subscribe([(topic_filter, qos)]), name=f"subscribe {link}")
                for link in links
            ]
        if links and not any(t.result() for t in tasks):
            raise MeshError(f"no broker acknowledged the subscription to {topic_filter!r}")

    async def unsubscribe(self, topic_filter: str) -> None:
        """Drop a subscription on every broker."""
        self._subs.pop(topic_filter, None)
        async with asyncio.TaskGroup() as tg:
            for link in self._links:
                if link.client is not None:
                    tg.create_task(link.unsubscribe(topic_filter), name=f"unsubscribe {link}")

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
    ) -> int:
        """Publish to every connected broker; returns how many took it.

        Waits up to `publish_timeout` for a broker when none is connected; MeshError when no
        broker took the message. QoS 0 (activations, results, acks, heartbeats) is handed to
        each connection and not waited for, so a dying broker holds no sender up; QoS 1 and 2
        wait for every broker's acknowledgement, never longer than `publish_timeout` each.
        """
        self._check_publish(topic, payload, qos)
        if not self._any_up.is_set():
            try:
                async with asyncio.timeout(self._publish_timeout):
                    await self._any_up.wait()
            except TimeoutError:
                raise MeshError(f"no broker connected to publish on {topic!r}") from None
        if qos == 0:
            return self.publish_nowait(topic, payload, retain=retain)
        links = [link for link in self._links if link.client is not None]
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(link.publish(topic, payload, qos, retain), name=f"publish {link}")
                for link in links
            ]
        # A task is cancelled when its broker connection drops mid-publish.
        acked = sum(1 for t in tasks if not t.cancelled() and t.result())
        if acked == 0:
            raise MeshError(f"no broker accepted the message on {topic!r}")
        self.counters.published += 1
        return acked

    def publish_nowait(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """A QoS 0 publish, handed to every connected broker's socket in this call; how many
        took it. MeshError when none did (none connected, or all refused)."""
        if topic not in self._checked:
            self._check_publish(topic, payload, 0)
            if len(self._checked) < _CHECKED_TOPICS:  # a valid name stays valid
                self._checked.add(topic)
        elif len(payload) > self._max_payload or self._closed:
            self._check_publish(topic, payload, 0)
        acked = sum(link.publish_now(topic, payload, retain) for link in self._links)
        if acked == 0:
            raise MeshError(f"no broker accepted the message on {topic!r}")
        self.counters.published += 1
        return acked

    def _check_publish(self, topic: str, payload: bytes, qos: int) -> None:
        _check_topic(aiomqtt.Topic, topic, qos)
        if len(payload) > self._max_payload:
            raise WireError(
                f"payload of {len(payload)} bytes is over the {self._max_payload} limit"
            )
        if self._closed:
            raise MeshError("publish on a closed MeshClient")

    def messages(self) -> AsyncIterator[MeshMessage]:
        """Incoming messages from all brokers, each once; ends when the client closes.

        One consumer at a time: two iterators would split the messages between them. The
        inbox is unbounded, so the consumer must keep up (MQTT has no backpressure to offer).
        """
        return _Messages(self._inbox)

    def set_handler(self, handler: Callable[[MeshMessage], bool] | None) -> None:
        """Give `handler` the first look at every new message, synchronously, in the read
        callback on the event loop thread; a message it takes (returns True) never reaches
        `messages()`. It sees a message only when nothing is queued before it, so the two
        ways keep the arrival order. Meant for the hot path (a node's activations, a client's
        results): it must not block, and what it publishes waits for the loop's writer
        (paho holds its callback lock), so it should leave publishing to a task."""
        self._handler = handler

    def _deliver(self, link: _Link, msg: paho_mqtt.MQTTMessage) -> None:
        # paho's on_message, on the event loop thread: no awaiting here. (aiomqtt's own would
        # wrap each message in a validated `aiomqtt.Message` and queue it, for nothing here.)
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            log.warning("dropped a message whose topic is not UTF-8, from %s", link.address)
            return
        payload = bytes(msg.payload)  # the same object: paho gives bytes
        self.counters.received += 1
        try:
            key = self._dedup_key(topic, payload)
        except Exception:
            # A faulty key function must not cut the broker connection (paho would).
            log.exception("dedup_key failed on %s; delivering without de-duplication", topic)
            key = None
        if key is not None and not self._seen.add(key):
            self.counters.duplicates += 1
            return
        m = MeshMessage(topic, payload, msg.retain, msg.qos, link.address)
        handler = self._handler
        if handler is not None and self._inbox.empty():
            try:
                if handler(m):
                    return
            except Exception:  # a bug in the handler must not cut the connection either
                log.exception("message handler failed on %s; message dropped", topic)
                return
        self._inbox.put_nowait(m)

    def _link_changed(self) -> None:
        if any(link.client is not None for link in self._links):
            self._any_up.set()
        else:
            self._any_up.clear()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


class _Messages:
    """Async iterator over the mesh inbox; `None` in the queue marks the end."""

    def __init__(self, queue: asyncio.Queue[MeshMessage | None]) -> None:
        self._queue = queue

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> MeshMessage:
        msg = await self._queue.get()
        if msg is None:
            self._queue.put_nowait(None)  # every other iterator ends too
            raise StopAsyncIteration
        return msg


class _Link:
    """One broker: a connection kept up forever by `run`, and the calls made over it."""

    def __init__(self, mesh: MeshClient, address: BrokerAddress) -> None:
        self.mesh = mesh
        self.address = address
        self.client: aiomqtt.Client | None = None  # set while connected and subscribed
        self.task: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        self._inflight: set[asyncio.Task[object]] = set()

    def __str__(self) -> str:
        return str(self.address)

    async def run(self) -> None:
        """Connect, re-subscribe, deliver; on any loss wait a jittered backoff and retry."""
        first, longest = self.mesh._backoff
        delay = first
        while True:
            try:
                async with self._new_client() as client:
                    await self._resubscribe(client)
                    self._up(client)
                    delay = first
                    try:
                        async for _ in client.messages:
                            pass  # messages go to the mesh inbox; this waits for a disconnect
                    finally:
                        self._down()
            except aiomqtt.MqttError as e:
                if self.last_error is None:
                    log.warning("broker %s unavailable: %s; retrying", self.address, e)
                self.last_error = str(e) or type(e).__name__
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, longest)

    def _new_client(self) -> aiomqtt.Client:
        mesh = self.mesh
        will = mesh._will
        client = aiomqtt.Client(
            self.address.host,
            self.address.port,
            identifier=mesh.client_id,
            clean_session=mesh._clean_session,
            keepalive=mesh._keepalive,
            will=aiomqtt.Will(will.topic, will.payload, will.qos, will.retain) if will else None,
            timeout=mesh._connect_timeout,
            max_inflight_messages=mesh._max_inflight,
            # Both ends need it: without it a small hop waits ~40-90 ms for Nagle.
            socket_options=(_NODELAY,),
            username=mesh.auth.username,
            password=mesh.auth.password,
            tls_context=mesh._tls,
        )
        # Messages go straight to the mesh (aiomqtt's `messages` then only waits for the
        # disconnection); its paho client has no public accessor.
        client._client.on_message = lambda _c, _u, msg: mesh._deliver(self, msg)
        return client

    async def _resubscribe(self, client: aiomqtt.Client) -> None:
        done: dict[str, int] = {}
        # Loop: subscribe() may add filters while we await; none may be missed.
        while pending := [(f, q) for f, q in self.mesh._subs.items() if done.get(f) != q]:
            _check_granted(
                self.address,
                pending,
                await client.subscribe(pending, timeout=self.mesh._publish_timeout),
            )
            done.update(pending)

    def _up(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.mesh.counters.connects += 1
        if self.last_error is not None:
            log.info("broker %s connected", self.address)
        self.last_error = None
        self.mesh._link_changed()

    def _down(self) -> None:
        self.client = None
        self.mesh._link_changed()
        # Acknowledgements of a dead connection never come; release their waiters now.
        for task in self._inflight:
            task.cancel()
        self._inflight.clear()

    def nodelay(self) -> bool:
        """TCP_NODELAY as the kernel reports it for this connection."""
        # aiomqtt does not expose paho's socket; `_client` is its paho client.
        sock = self.client._client.socket() if self.client is not None else None
        if not isinstance(sock, socket.socket):
            return False
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        """Publish over this connection; False if it failed or timed out."""
        client, task = self.client, asyncio.current_task()
        if client is None or task is None:
            return False
        self._inflight.add(task)
        try:
            await client.publish(
                topic, payload, qos=qos, retain=retain, timeout=self.mesh._publish_timeout
            )
            return True
        except aiomqtt.MqttError as e:
            log.debug("publish to %s failed: %s", self.address, e)
            return False
        finally:
            self._inflight.discard(task)

    def publish_now(self, topic: str, payload: bytes, retain: bool) -> bool:
        """A QoS 0 publish written to the socket in this call; False if the connection
        refused it.

        aiomqtt's `publish` would wait, through an event, a timeout and a task per copy, for
        a confirmation QoS 0 does not have. Left to itself, paho would then queue the packet
        and have aiomqtt register a socket writer through `call_soon_threadsafe` (a self-pipe
        write, two `epoll_ctl` and two more turns of the loop per copy). Here paho is told a
        writer is already registered, so it schedules none, and the packet is written at
        once; only what the socket does not take now gets a writer, the usual way. (Writing
        without that flag raced the deferred registration: a writer left on an
        always-writable socket, and the node spun.)
        """
        client = self.client
        if client is None:
            return False
        paho = client._client  # aiomqtt keeps its paho client there, with no public accessor
        # paho's own condition for writing in place: not inside one of its callbacks (the
        # write may run `on_publish` under the non-reentrant callback lock).
        if not paho._in_callback_mutex.acquire(blocking=False):
            info = paho.publish(topic, payload, qos=0, retain=retain)
            return info.rc == paho_mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        paho._in_callback_mutex.release()
        registered = paho._registered_write  # a writer is already draining earlier packets
        paho._registered_write = True  # no deferred registration from `publish`
        try:
            info = paho.publish(topic, payload, qos=0, retain=retain)
            ok = info.rc == paho_mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
            if ok:
                try:
                    paho.loop_write()  # a lost connection goes through paho's rc handling
                except Exception:  # left to aiomqtt's writer, which meets it and disconnects
                    log.debug("writing to %s failed; left to the writer", self, exc_info=True)
        finally:
            if not registered:
                paho._registered_write = False
                if paho.want_write():  # what the socket did not take now: the usual writer
                    paho._call_socket_register_write()
        return ok

    async def subscribe(self, filters: list[tuple[str, int]]) -> bool:
        """Subscribe over this connection; False if it failed (the next connect re-applies)."""
        client = self.client
        if client is None:
            return False
        try:
            granted = await client.subscribe(filters, timeout=self.mesh._publish_timeout)
        except aiomqtt.MqttError as e:
            log.warning("subscribe on %s failed: %s", self.address, e)
            return False
        return _check_granted(self.address, filters, granted)

    async def unsubscribe(self, topic_filter: str) -> None:
        """Unsubscribe over this connection; a failure only matters until the next connect."""
        client = self.client
        if client is not None:
            try:
                await client.unsubscribe(topic_filter, timeout=self.mesh._publish_timeout)
            except aiomqtt.MqttError as e:
                log.warning("unsubscribe on %s failed: %s", self.address, e)


def _check_topic(kind: type[aiomqtt.Wildcard], name: str, qos: int) -> None:
    """ConfigError on a topic (or filter) or QoS paho would reject deep inside a task."""
    try:
        kind(name)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad MQTT {kind.__name__.lower()} {name!r}: {e}") from e
    if qos not in (0, 1, 2):
        raise ConfigError(f"bad QoS {qos!r}: 0, 1 or 2")


def _check_granted(
    address: BrokerAddress, filters: list[tuple[str, int]], granted: Sequence[object]
) -> bool:
    """Log the filters a broker refused (a SUBACK failure code, e.g. an ACL); True if none."""
    refused = [
        f for (f, _), rc in zip(filters, granted, strict=False) if getattr(rc, "is_failure", False)
    ]
    if refused:
        log.warning("broker %s refused subscriptions %s", address, refused)
    return not refused
