"""Messages for one topic posted in the same pass of the event loop leave as one bundle.

A node that runs k sessions in one forward passes k activations to the next node and
acknowledges k messages to the previous one. Each MQTT message costs a few hundred µs of Python
at both ends (and a send per broker), so sent one by one those messages, not the forward, would
bound how many sessions a mesh serves. `post` queues a payload and returns at once; the queue
is published at the next turn of the loop, one `wire.bundle` per topic (up to `max_bytes`
each), in the order the topics were first posted to. One session's message still goes out
alone and unwrapped, one loop turn later; a caller that knows it has posted all there is for
now (a node that passed on a whole wave) calls `flush_now` and spares that turn.

Delivery is as for any QoS 0 publish: a failure is logged and the chain of custody re-sends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from types import TracebackType
from typing import Self

from jarvis_mqtt import wire
from jarvis_mqtt.errors import JarvisError
from jarvis_mqtt.transport import MeshClient

log = logging.getLogger("jarvis.outbox")
_Posted = tuple[bytes, "asyncio.Future[bool]"]
_Waiting = dict[tuple[str, int], list[_Posted]]  # (topic, qos) -> posts, in order
BUNDLE_BYTES = 1 << 20  # a bundle stops growing here; a larger message goes alone


class Outbox:
    """Coalescing publisher over a `MeshClient`; an async context manager that flushes on exit."""

    def __init__(self, mesh: MeshClient, *, max_bytes: int = BUNDLE_BYTES) -> None:
        self.mesh = mesh
        self.max_bytes = max_bytes
        self._waiting: _Waiting = {}
        self._flusher: asyncio.Task[None] | None = None  # publishing what must wait
        self._turn: asyncio.Handle | None = None  # the flush at the next turn of the loop
        self.bundles = 0  # MQTT messages published, for stats
        self.parts = 0  # payloads they carried

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.flush()

    def post(self, topic: str, payload: bytes, qos: int = 0) -> asyncio.Future[bool]:
        """Queue `payload` for `topic`; it is published at the next turn of the event loop.

        The future says whether a broker took it (False: logged, no broker did); await it
        only where something must wait for the message to be out, like an ack for it."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._waiting.setdefault((topic, qos), []).append((payload, done))
        if self._turn is None and not self._flushing:
            self._turn = loop.call_soon(self.flush_now)
        return done

    async def flush(self) -> None:
        """Publish what is queued now, and wait for what is being published."""
        self.flush_now()
        if self._flusher is not None:
            await asyncio.shield(self._flusher)

    def flush_now(self) -> None:
        """Publish what is queued now, in this call, and resolve its futures.

        Only QoS 0 goes out without waiting, and only with a broker connected; anything else
        is left to a flusher task (which waits for a broker), and so is what is posted while
        one runs, so the order of posts is kept."""
        if self._turn is not None:
            self._turn.cancel()
            self._turn = None
        if not self._waiting or self._flushing:
            return
        if not self.mesh.any_connected or any(qos != 0 for _, qos in self._waiting):
            self._flusher = asyncio.create_task(self._flush_all(), name="outbox")
            return
        waiting, self._waiting = self._waiting, {}
        for topic, _, chunk, payload in self._bundles(waiting):
            try:
                self.mesh.publish_nowait(topic, payload)
            except JarvisError as e:
                self._sent(topic, chunk, e)
            else:
                self._sent(topic, chunk, None)

    def _bundles(self, waiting: _Waiting) -> Iterator[tuple[str, int, list[_Posted], bytes]]:
        """(topic, qos, the posts, their bundle) for each MQTT message `waiting` makes."""
        for (topic, qos), posted in waiting.items():
            for chunk in _chunks(posted, self.max_bytes):
                yield topic, qos, chunk, wire.bundle([p for p, _ in chunk])

    def _sent(self, topic: str, chunk: list[_Posted], error: JarvisError | None) -> None:
        if error is not None:  # the chain of custody re-sends what mattered
            log.warning("%d message(s) on %s not sent: %s", len(chunk), topic, error)
        else:
            self.bundles += 1
            self.parts += len(chunk)
        for _, done in chunk:
            if not done.done():
                done.set_result(error is None)

    @property
    def _flushing(self) -> bool:
        return self._flusher is not None and not self._flusher.done()

    @property
    def pending(self) -> int:
        """Payloads queued and not yet handed to the brokers."""
        return sum(len(parts) for parts in self._waiting.values())

    async def _flush_all(self) -> None:
        while self._waiting:  # posts made while publishing go out in the next round
            waiting, self._waiting = self._waiting, {}
            for topic, qos, chunk, payload in self._bundles(waiting):
                try:
                    await self.mesh.publish(topic, payload, qos=qos)
                except JarvisError as e:
                    self._sent(topic, chunk, e)
                else:
                    self._sent(topic, chunk, None)


def _chunks(posted: list[_Posted], max_bytes: int) -> list[list[_Posted]]:
    """Consecutive runs of `posted` of at most `max_bytes` (a larger payload runs alone)."""
    out: list[list[_Posted]] = []
    size = 0
    for item in posted:
        n = len(item[0])
        if out and size + n <= max_bytes and len(out[-1]) < wire.MAX_BUNDLE_PARTS:
            out[-1].append(item)
            size += n
        else:
            out.append([item])
            size = n
    return out
