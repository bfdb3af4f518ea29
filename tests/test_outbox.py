"""Outbox on real brokers: what one loop turn posts to a topic arrives as one MQTT message."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator

import pytest

from jarvis_mqtt import wire
from jarvis_mqtt.brokers import BrokerAddress
from jarvis_mqtt.outbox import Outbox
from jarvis_mqtt.transport import MeshClient, MeshMessage
from tests.conftest_brokers import Broker

pytestmark = pytest.mark.integration


def client(addrs: list[BrokerAddress], name: str, **kw: float) -> MeshClient:
    kw.setdefault("connect_timeout", 5.0)
    return MeshClient(addrs, client_id=f"{name}-{os.getpid()}-{time.monotonic_ns()}", **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def subscribed_pair(
    addrs: list[BrokerAddress], topic_root: str
) -> AsyncIterator[tuple[MeshClient, MeshClient]]:
    """(subscriber to `topic_root/+`, publisher), both connected to every broker."""
    async with client(addrs, "sub") as sub, client(addrs, "pub") as pub:
        await sub.wait_connected(len(addrs))
        await pub.wait_connected(len(addrs))
        await sub.subscribe(f"{topic_root}/+", qos=0)
        yield sub, pub


def test_posts_of_one_turn_leave_as_one_bundle_per_topic(
    brokers: list[Broker], topic_root: str
) -> None:
    addrs = [b.address for b in brokers]
    a, b = f"{topic_root}/a", f"{topic_root}/b"

    async def main() -> list[MeshMessage]:
        async with subscribed_pair(addrs, topic_root) as (sub, pub):
            got: list[MeshMessage] = []
            async with Outbox(pub, max_bytes=64) as out:
                sent = [out.post(a, b"a%d" % i) for i in range(3)] + [out.post(b, b"b0")]
                assert out.pending == 4  # nothing leaves before the loop turns
                assert await asyncio.gather(*sent) == [True] * 4
                # Parts past max_bytes start a new bundle; a part over it goes alone. (Contents
                # differ: the mesh takes the same non-wire payload twice for a duplicate.)
                big = [out.post(a, bytes(40)), out.post(a, b"x" * 40), out.post(a, bytes(100))]
                assert await asyncio.gather(*big) == [True] * 3
                out.post(b, b"alone")
            assert out.pending == 0  # leaving the block flushed it
            assert (out.bundles, out.parts) == (6, 8)
            async with asyncio.timeout(5):
                async for m in sub.messages():
                    got.append(m)
                    if len(got) == 6:
                        break
            await asyncio.sleep(0.1)
            assert sub.counters.received == 12  # each bundle once per broker, one copy kept
            return got

    got = asyncio.run(main())
    by_topic = [(m.topic, [bytes(p) for p in wire.unbundle(m.payload)]) for m in got]
    assert by_topic == [
        (a, [b"a0", b"a1", b"a2"]),
        (b, [b"b0"]),
        (a, [bytes(40)]),
        (a, [b"x" * 40]),
        (a, [bytes(100)]),
        (b, [b"alone"]),
    ]
    assert got[1].payload == b"b0"  # a lone message is not wrapped


def test_flush_now_publishes_in_the_call(brokers: list[Broker], topic_root: str) -> None:
    addrs = [b.address for b in brokers]
    a, b = f"{topic_root}/a", f"{topic_root}/b"

    async def main() -> list[MeshMessage]:
        async with subscribed_pair(addrs, topic_root) as (sub, pub):
            out = Outbox(pub)
            sent = [out.post(a, b"a0"), out.post(a, b"a1"), out.post(b, b"b0")]
            out.flush_now()  # no turn of the loop: handed to both brokers' sockets here
            assert [f.done() and f.result() for f in sent] == [True] * 3
            assert out.pending == 0 and (out.bundles, out.parts) == (2, 3)
            got: list[MeshMessage] = []
            async with asyncio.timeout(5):
                async for m in sub.messages():
                    got.append(m)
                    if len(got) == 2:
                        return got
            return got

    got = asyncio.run(main())
    assert [(m.topic, [bytes(p) for p in wire.unbundle(m.payload)]) for m in got] == [
        (a, [b"a0", b"a1"]),
        (b, [b"b0"]),
    ]


def test_a_post_no_broker_takes_says_so(mosquitto: Broker, topic_root: str) -> None:
    async def main() -> None:
        async with client([mosquitto.address], "pub", publish_timeout=0.3) as pub:
            out = Outbox(pub)
            assert await out.post(f"{topic_root}/x", b"sent") is True
            mosquitto.kill()
            await asyncio.sleep(0.2)  # the link sees its broker gone
            assert await out.post(f"{topic_root}/x", b"lost") is False
            assert out.pending == 0 and (out.bundles, out.parts) == (1, 1)
            # With no broker, flush_now leaves it to a flusher that waits for one, in vain.
            late = out.post(f"{topic_root}/x", b"late")
            out.flush_now()
            assert not late.done()
            assert await late is False

    asyncio.run(main())
