"""Echo relay for the per-hop latency figure: a node's message handling without the compute.

`python -m bench.relay --broker H:P,H:P --topic-root R` subscribes to `R/ping` on every broker,
and answers each activation as a node passes one on: decode it, wrap the tensor in a new
activation with one more route hop, encode and publish it on `R/pong` to every broker.
`echo_latency` is the other side: it times round trips from this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from jarvis_mqtt import topics as T
from jarvis_mqtt import wire
from jarvis_mqtt.brokers import BrokerAddress, parse_brokers
from jarvis_mqtt.errors import WireError
from jarvis_mqtt.mesh import stop_pid
from jarvis_mqtt.transport import MeshClient

MAX_BYTES = 16 << 20


def _topics(root: str) -> tuple[str, str]:
    return f"{root}/ping", f"{root}/pong"


async def serve(brokers: Sequence[BrokerAddress], root: str) -> None:
    """Echo every activation on `root/ping` back on `root/pong` until cancelled."""
    ping, pong = _topics(root)
    node = T.NodeId("relay")
    async with MeshClient(list(brokers), client_id=f"bench-relay-{uuid.uuid4().hex[:8]}") as mc:
        await mc.subscribe(ping)
        async for m in mc.messages():
            try:
                msg = wire.decode(m.payload, max_bytes=MAX_BYTES)
            except WireError as e:  # not from the bench: say so and keep echoing
                print(f"relay: ignored a message on {m.topic}: {e}", file=sys.stderr)
                continue
            if not isinstance(msg, wire.ActivationMessage):
                continue
            t_in = time.time()
            hidden = msg.to_tensor()
            hop = wire.RouteHop(node, msg.layer, msg.layer + 1, t_in, time.time())
            out = wire.ActivationMessage.from_tensor(
                hidden, sid=msg.sid, cid=msg.cid, model=msg.model, step=msg.step, pos=msg.pos,
                layer=msg.layer + 1, route=(*msg.route, hop),
            )  # fmt: skip
            await mc.publish(pong, wire.encode(out), qos=T.NODE_LAYER.qos)


def _die_with_parent() -> Callable[[], None]:
    """pre-exec hook: Linux SIGKILLs the relay if the bench dies without stopping it."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, see brokers.py

    def hook() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return hook


def start(brokers: Sequence[BrokerAddress], root: str, log: Path) -> subprocess.Popen[bytes]:
    """Start a relay process; the caller stops it with `stop`."""
    cmd = [sys.executable, "-m", "bench.relay", "--broker", ",".join(map(str, brokers))]
    with log.open("ab") as out:
        return subprocess.Popen(
            [*cmd, "--topic-root", root],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
            preexec_fn=_die_with_parent(),
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a relay by its pid and reap it."""
    stop_pid(proc.pid)
    proc.wait()


async def echo_latency(
    brokers: Sequence[BrokerAddress],
    root: str,
    *,
    floats: int,
    count: int,
    warmup: int,
    idle: float = 0.0,
    ready_timeout: float = 60.0,
) -> list[float]:
    """Round-trip seconds of `count` sequential activations of `floats` float32 through a relay.

    Timed from before encoding the ping to after decoding the pong: two hops, each with what a
    node does around its compute (encode, publish to every broker, deliver, dedup, decode).
    With `idle`, every process sleeps that long (untimed) before each ping, as a pipeline's
    nodes and brokers do between one token and the next.
    """
    ping, pong = _topics(root)
    arrived: dict[int, asyncio.Future[float]] = {}
    loop = asyncio.get_running_loop()
    tensor = torch.randn(1, floats)

    async def read(mc: MeshClient) -> None:
        async for m in mc.messages():
            msg = wire.decode(m.payload, max_bytes=MAX_BYTES)
            if isinstance(msg, wire.ActivationMessage):
                msg.to_tensor()
                fut = arrived.get(msg.step)
                if fut is not None and not fut.done():
                    fut.set_result(time.perf_counter())

    async def once(i: int, timeout: float) -> float:
        arrived[i] = loop.create_future()
        t0 = time.perf_counter()
        msg = wire.ActivationMessage.from_tensor(
            tensor, sid=T.SessionId("echo"), cid=T.ClientId("bench"), model="echo", step=i,
            pos=0, layer=0,
        )  # fmt: skip
        sent = asyncio.ensure_future(mc.publish(ping, wire.encode(msg), qos=T.NODE_LAYER.qos))
        try:
            t1 = await asyncio.wait_for(asyncio.shield(arrived[i]), timeout)
        finally:
            await sent
            del arrived[i]
        return t1 - t0

    rtts: list[float] = []
    async with MeshClient(list(brokers), client_id=f"bench-echo-{uuid.uuid4().hex[:8]}") as mc:
        await mc.subscribe(pong)
        async with asyncio.TaskGroup() as tg:
            reader = tg.create_task(read(mc), name="echo reader")
            try:
                # The relay may still be starting: ping until the first answer.
                deadline = time.monotonic() + ready_timeout
                seq = 1 << 20
                while True:
                    try:
                        await once(seq, 0.5)
                        break
                    except TimeoutError:
                        if time.monotonic() > deadline:
                            raise
                        seq += 1
                for i in range(warmup + count):
                    if idle:
                        await asyncio.sleep(idle)
                    rtt = await once(i, 10.0)
                    if i >= warmup:
                        rtts.append(rtt)
            finally:
                reader.cancel()
    return rtts


def main() -> None:
    """Entry point of the relay process."""
    p = argparse.ArgumentParser(prog="python -m bench.relay")
    p.add_argument("--broker", required=True)
    p.add_argument("--topic-root", required=True)
    a = p.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(parse_brokers(a.broker), a.topic_root))


if __name__ == "__main__":
    main()
