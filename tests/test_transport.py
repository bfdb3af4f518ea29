"""MeshClient against real Mosquitto brokers: redundancy, failover, wills, latency."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from jarvis_mqtt.brokers import BrokerAddress, MosquittoBroker, free_port, parse_brokers
from jarvis_mqtt.dedup import default_dedup_key
from jarvis_mqtt.errors import ConfigError, MeshError, WireError
from jarvis_mqtt.topics import Topics
from jarvis_mqtt.transport import MeshClient, MeshMessage
from jarvis_mqtt.wire import ActivationMessage, decode, encode
from tests.conftest_brokers import Broker

pytestmark = pytest.mark.integration
T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run one test coroutine with a hard bound."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def mesh(addrs: list[BrokerAddress], name: str, **kw: Any) -> MeshClient:
    kw.setdefault("connect_timeout", 5.0)
    kw.setdefault("backoff", (0.02, 0.2))
    return MeshClient(addrs, client_id=f"{name}-{os.getpid()}-{time.monotonic_ns()}", **kw)


async def collect(client: MeshClient, out: list[MeshMessage], count: int) -> None:
    async for msg in client.messages():
        out.append(msg)
        if len(out) == count:
            return


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Poll `check` (state owned by other tasks) until true; fail after `within` seconds."""
    for _ in range(int(within / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition still false after {within} s")


def activation(i: int) -> bytes:
    x = torch.full((1, 8), float(i))
    msg = ActivationMessage.from_tensor(x, sid="s", cid="c", model="m", step=i, pos=i, layer=0)
    return encode(msg)


def test_two_brokers_deliver_each_message_once(brokers: list[Broker], topic_root: str) -> None:
    topics, addrs = Topics(topic_root), [b.address for b in brokers]

    async def main() -> None:
        async with mesh(addrs, "sub") as sub, mesh(addrs, "pub") as pub:
            await sub.wait_connected(2)
            await pub.wait_connected(2)
            assert sorted(sub.connected_brokers()) == sorted(addrs)
            await sub.subscribe(topics.all_layers("m"))
            got: list[MeshMessage] = []
            async with asyncio.TaskGroup() as tg:
                tg.create_task(collect(sub, got, 100), name="collect")
                for i in range(100):
                    assert await pub.publish(topics.layer("m", i % 3), activation(i)) == 2
            steps = [decode(m.payload, max_bytes=1 << 20).step for m in got]  # type: ignore[union-attr]
            assert steps == list(range(100))  # once each, and in order
            await asyncio.sleep(0.1)  # late copies would show up as extra messages
            assert sub.counters.received == 200 and sub.counters.duplicates == 100
            assert sub._inbox.empty()

    run(main())


def test_a_handler_takes_its_messages_before_the_queue(
    brokers: list[Broker], topic_root: str
) -> None:
    """What the handler takes (once, duplicates already dropped) never reaches `messages()`;
    what it declines, and whatever it raises on, is queued or dropped as documented."""
    topics, addrs = Topics(topic_root), [b.address for b in brokers]

    async def main() -> None:
        async with mesh(addrs, "sub") as sub, mesh(addrs, "pub") as pub:
            await sub.wait_connected(2)
            await pub.wait_connected(2)
            await sub.subscribe(topics.all_layers("m"))
            taken: list[int] = []

            def handler(m: MeshMessage) -> bool:
                step = decode(m.payload, max_bytes=1 << 20).step  # type: ignore[union-attr]
                if step == 5:
                    raise RuntimeError("a bug in the handler")
                if step % 2 == 0:
                    taken.append(step)  # in the read callback, before any loop turn
                    return True
                return False

            sub.set_handler(handler)
            queued = sub.messages()
            steps: list[int] = []
            for i in range(10):  # one at a time: a message queued first would hold the rest
                assert await pub.publish(topics.layer("m", 0), activation(i), qos=0) == 2
                await eventually(lambda i=i: sub.counters.received == 2 * (i + 1))  # type: ignore[misc]
                if i % 2 and i != 5:
                    m = await anext(queued)
                    steps.append(decode(m.payload, max_bytes=1 << 20).step)  # type: ignore[union-attr]
            assert taken == [0, 2, 4, 6, 8] and steps == [1, 3, 7, 9]  # 5: logged, dropped
            assert sub.counters.duplicates == 10

    run(main())


def test_broker_killed_mid_stream_loses_and_duplicates_nothing(
    brokers: list[Broker], topic_root: str
) -> None:
    topic, addrs = Topics(topic_root).layer("m", 0), [b.address for b in brokers]

    async def main() -> None:
        async with mesh(addrs, "sub") as sub, mesh(addrs, "pub") as pub:
            await sub.wait_connected(2)
            await pub.wait_connected(2)
            await sub.subscribe(topic)
            got: list[MeshMessage] = []
            async with asyncio.TaskGroup() as tg:
                tg.create_task(collect(sub, got, 500), name="collect")
                for i in range(500):
                    if i == 200:
                        brokers[0].kill()
                    await pub.publish(topic, activation(i))
            steps = [decode(m.payload, max_bytes=1 << 20).step for m in got]  # type: ignore[union-attr]
            assert sorted(steps) == list(range(500))
            await asyncio.sleep(0.1)
            assert sub._inbox.empty()  # no duplicate behind the 500th
            assert pub.connected_brokers() == [brokers[1].address]

    run(main())


def test_dead_broker_in_the_list_is_tolerated(mosquitto: Broker, topic_root: str) -> None:
    dead = BrokerAddress("127.0.0.1", free_port())
    addrs, topic = [dead, mosquitto.address], f"{topic_root}/x"

    async def main() -> None:
        async with mesh(addrs, "sub") as sub, mesh(addrs, "pub") as pub:
            assert sub.connected_brokers() == [mosquitto.address]
            await sub.subscribe(topic)
            assert await pub.publish(topic, b"hello") == 1
            got: list[MeshMessage] = []
            await collect(sub, got, 1)
            assert got[0].payload == b"hello" and got[0].broker == mosquitto.address

    run(main())


def test_no_broker_reachable_is_a_mesh_error() -> None:
    addrs = [BrokerAddress("127.0.0.1", free_port()), BrokerAddress("127.0.0.1", free_port())]

    async def main() -> None:
        with pytest.raises(MeshError, match="no broker reachable"):
            async with mesh(addrs, "x", connect_timeout=0.5):
                pass

    run(main())


def test_cancelled_enter_leaves_no_task_behind() -> None:
    addrs = [BrokerAddress("127.0.0.1", free_port())]

    async def main() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3), mesh(addrs, "x", connect_timeout=10):
                pass
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(main())


def test_restarted_broker_is_reconnected_and_used(brokers: list[Broker], topic_root: str) -> None:
    topic, addrs = f"{topic_root}/x", [b.address for b in brokers]

    async def main() -> None:
        async with mesh(addrs, "sub") as sub, mesh(addrs, "pub") as pub:
            await sub.subscribe(topic)
            await sub.wait_connected(2)
            brokers[0].kill()
            await eventually(lambda: len(sub.connected_brokers()) == 1)
            brokers[0].restart()
            async with asyncio.timeout(5):
                await sub.wait_connected(2)
                await pub.wait_connected(2)
            brokers[1].kill()  # from now on only the restarted broker carries anything
            await eventually(lambda: pub.connected_brokers() == [brokers[0].address])
            await eventually(lambda: sub.connected_brokers() == [brokers[0].address])
            assert await pub.publish(topic, b"after restart") == 1
            got: list[MeshMessage] = []
            await collect(sub, got, 1)  # the subscription was re-applied on reconnect
            assert got[0].payload == b"after restart" and got[0].broker == brokers[0].address
            assert sub.counters.connects == 3

    run(main())


WILL_CLIENT = textwrap.dedent(
    """
    import asyncio, sys
    from jarvis_mqtt.brokers import parse_brokers
    from jarvis_mqtt.transport import LastWill, MeshClient

    async def main() -> None:
        will = LastWill(sys.argv[2], b"offline", qos=1, retain=True)
        async with MeshClient(parse_brokers(sys.argv[1]), client_id="doomed", will=will,
                              keepalive=5) as client:
            async with asyncio.timeout(5):
                await client.wait_connected(2)
            print("ready", flush=True)
            await asyncio.sleep(60)

    asyncio.run(main())
    """
)


def test_last_will_arrives_once_on_sigkill(brokers: list[Broker], topic_root: str) -> None:
    addrs = [b.address for b in brokers]
    will_topic = Topics(topic_root).node_status("doomed")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WILL_CLIENT, ",".join(map(str, addrs)), will_topic],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:

        async def main() -> float:
            async with mesh(addrs, "watcher") as watcher:
                await watcher.wait_connected(2)
                await watcher.subscribe(will_topic)
                assert proc.stdout is not None
                line = await asyncio.to_thread(proc.stdout.readline)
                assert line.strip() == b"ready"
                # The will waits for the kernel to tear the process down: that takes longer
                # the more memory it maps (~2 ms bare, ~13 ms with torch imported).
                killed = time.perf_counter()
                os.kill(proc.pid, signal.SIGKILL)
                got: list[MeshMessage] = []
                await collect(watcher, got, 1)
                delay = time.perf_counter() - killed
                await asyncio.sleep(0.2)  # the second broker's copy must be dropped
                assert [m.payload for m in got] == [b"offline"] and got[0].retain is False
                assert watcher.counters.duplicates == 1
                return delay

        delay = run(main())
        print(f"\nlast will arrived {delay * 1e3:.1f} ms after SIGKILL")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_retained_updates_pass_and_repeats_are_dropped(
    brokers: list[Broker], topic_root: str
) -> None:
    topic, addrs = Topics(topic_root).node_status("n1"), [b.address for b in brokers]

    async def main() -> None:
        async with mesh(addrs, "node") as node:
            await node.wait_connected(2)
            await node.publish(topic, b"online t=1", retain=True)
            async with mesh(addrs, "late") as late:
                await late.wait_connected(2)
                await late.subscribe(topic)
                got: list[MeshMessage] = []
                await collect(late, got, 1)  # retained copy from each broker, kept once
                await node.publish(topic, b"online t=2", retain=True)
                await collect(late, got, 2)
                await node.publish(topic, b"online t=2", retain=True)  # an exact repeat
                await asyncio.sleep(0.2)
                assert [m.payload for m in got] == [b"online t=1", b"online t=2"]
                assert got[0].retain and not got[1].retain

    run(main())


def test_bad_topics_are_refused_before_reaching_paho(mosquitto: Broker, topic_root: str) -> None:
    async def main() -> None:
        async with mesh([mosquitto.address], "x") as client:
            for bad in ("a/#/b", "a+", ""):
                with pytest.raises(ConfigError):
                    await client.subscribe(bad)
            for bad in ("a/+", "a/#", ""):
                with pytest.raises(ConfigError):
                    await client.publish(bad, b"x")
            with pytest.raises(ConfigError):
                await client.publish(f"{topic_root}/ok", b"x", qos=3)
            await client.subscribe(f"{topic_root}/ok")  # the client is still healthy
            assert await client.publish(f"{topic_root}/ok", b"x") == 1

    run(main())


def test_tcp_nodelay_on_every_socket(brokers: list[Broker]) -> None:
    async def main() -> None:
        async with mesh([b.address for b in brokers], "n") as client:
            await client.wait_connected(2)
            assert client.tcp_nodelay() == {b.address: True for b in brokers}

    run(main())


def test_payload_limits(mosquitto: Broker, topic_root: str) -> None:
    topic = f"{topic_root}/big"

    async def main() -> None:
        async with mesh([mosquitto.address], "big", max_payload=2 << 20) as client:
            await client.subscribe(topic)
            big = os.urandom(2 << 20)
            assert await client.publish(topic, big) == 1
            got: list[MeshMessage] = []
            await collect(client, got, 1)
            assert got[0].payload == big
            with pytest.raises(WireError, match="over"):
                await client.publish(topic, big + b"!")

    run(main())


def test_qos0_larger_than_the_socket_takes_arrives_whole_and_leaves_no_spin(
    brokers: list[Broker], topic_root: str
) -> None:
    """QoS 0 is written in the publishing call; what the socket does not take at once goes
    out through a writer, which is removed when done (a writer left on an always-writable
    socket would spin the loop: CPU time while idle shows it)."""
    topic, addrs = f"{topic_root}/qos0", [b.address for b in brokers]
    sizes = [5, 7]  # big ones exceed a socket's buffer

    async def main() -> float:
        async with mesh(addrs, "sub") as sub, mesh(addrs, "pub") as pub:
            await sub.wait_connected(2)
            await pub.wait_connected(2)
            await sub.subscribe(topic)
            sent = [bytes([i]) * n for i, n in enumerate(sizes)]
            got: list[MeshMessage] = []
            async with asyncio.TaskGroup() as tg:
                tg.create_task(collect(sub, got, len(sent) - 1), name="collect")
                for payload in sent[:-1]:  # back to back: later ones queue behind partial writes
                    assert await pub.publish(topic, payload, qos=0) == 2
            async with asyncio.TaskGroup() as tg:  # then one alone, on an idle connection
                tg.create_task(collect(sub, got, len(sent)), name="collect")
                assert await pub.publish(topic, sent[-1], qos=0) == 2
            assert [m.payload for m in got] == sent  # whole, once each, in order
            await asyncio.sleep(0.2)
            assert sub.counters.received == 2 * len(sent)
            cpu = time.process_time()
            await asyncio.sleep(1.0)
            return time.process_time() - cpu

    idle_cpu = run(main(), timeout=60.0)
    assert idle_cpu < 0.3, f"{idle_cpu:.2f} s of CPU in 1 s idle: a writer is spinning"


def test_hop_latency_4k(mosquitto: Broker, topic_root: str) -> None:
    """Print the time from publish to delivery of a 4 KiB payload through one broker."""
    topic = f"{topic_root}/lat"

    async def main() -> list[float]:
        async with mesh([mosquitto.address], "a") as a, mesh([mosquitto.address], "b") as b:
            await b.subscribe(topic)
            inbox = b.messages()
            times: list[float] = []
            for i in range(300):
                payload = i.to_bytes(4, "big") + bytes(4092)
                t0 = time.perf_counter()
                await a.publish(topic, payload, qos=1)
                msg = await anext(inbox)
                times.append(time.perf_counter() - t0)
                assert msg.payload == payload
            return times[50:]

    times = run(main())
    q = statistics.quantiles(times, n=10)
    print(
        f"\n4 KiB hop through one broker (publish -> delivered, QoS 1): "
        f"median {statistics.median(times) * 1e3:.3f} ms, p90 {q[8] * 1e3:.3f} ms"
    )
    assert statistics.median(times) < 0.05  # Nagle alone would make this ~40-90 ms


# -- the broker process and addresses --------------------------------------------------------


def test_parse_brokers() -> None:
    assert parse_brokers("a:1, b ,[::1]:5,a:1") == [
        BrokerAddress("a", 1),
        BrokerAddress("b", 1883),
        BrokerAddress("::1", 5),
    ]
    assert str(BrokerAddress("::1", 5)) == "[::1]:5" and str(BrokerAddress("h", 7)) == "h:7"
    for bad in ("", " , ", "a:0", "a:70000", "a:x", "[::1", ":1883", "a b:1"):
        with pytest.raises(ConfigError):
            parse_brokers(bad)


def test_broker_restart_keeps_its_port_and_stop_reaps(tmp_path: Path) -> None:
    with MosquittoBroker(run_dir=tmp_path, die_with_parent=True) as broker:
        first_pid, address = broker.pid, broker.address
        broker.kill()
        assert not broker.running
        broker.restart()
        assert broker.address == address and broker.pid != first_pid
        last_pid = broker.pid
    with pytest.raises(ProcessLookupError):  # reaped: not even a zombie is left
        os.kill(last_pid, 0)
    assert "running" in (tmp_path / "mosquitto.log").read_text()


def test_broker_start_failure_shows_the_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with (
            pytest.raises(MeshError, match=r"(?s)exited.*Address already in use"),
            MosquittoBroker(port=port, run_dir=tmp_path),  # stopped even if it starts
        ):
            pass


def test_dedup_key_reads_a_wire_header_not_its_tensor() -> None:
    one, other = activation(1), activation(1)  # equal contents, each its own message id
    assert default_dedup_key("t", one) == default_dedup_key("t", bytes(one))
    assert default_dedup_key("t", one) != default_dedup_key("t", other)
    assert default_dedup_key("t", one) != default_dedup_key("u", one)
    body = len(one) - 8 * 4  # the (1, 8) float32 tensor ends the payload
    assert default_dedup_key("t", one[:body] + bytes(32)) == default_dedup_key("t", one)
    # Anything else is hashed whole: a status that changed is a new message.
    assert default_dedup_key("t", b"JV\x00\x00\x00\x09 short") != default_dedup_key("t", b"x")
    assert default_dedup_key("t", b"online") != default_dedup_key("t", b"offline")
