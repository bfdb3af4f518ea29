"""Forwarder.send_nowait: routing, custody and the history, on an outbox whose mesh records."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from jarvis_mqtt import topics as T
from jarvis_mqtt import wire
from jarvis_mqtt.errors import MeshError
from jarvis_mqtt.forwarder import Forwarder
from jarvis_mqtt.membership import MeshView, NodeStatus
from jarvis_mqtt.outbox import Outbox


class RecordingMesh:
    """What an Outbox needs of a MeshClient, keeping what is published."""

    any_connected = True

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish_nowait(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        self.published.append((topic, payload))
        return 1


def forwarder(*spans: tuple[str, int, int]) -> tuple[Forwarder, RecordingMesh]:
    view = MeshView()
    for node, start, end in spans:
        status = NodeStatus(
            node_id=node, model="m", start=start, end=end, online=True, time=time.time(),
            host="h", pid=1, capacity={}, load={},
        )  # fmt: skip
        view.update(status)
    mesh = RecordingMesh()

    async def on_error(*_: str) -> None:
        raise AssertionError("no error expected")

    fw = Forwarder(
        Outbox(mesh),  # type: ignore[arg-type]
        T.Topics("t"), view, model="m", num_layers=4, me="node-a", on_error=on_error,
    )  # fmt: skip
    return fw, mesh


def test_send_nowait_posts_now_and_records_the_history_at_the_next_turn() -> None:
    fw, mesh = forwarder(("node-a", 0, 2), ("node-b", 2, 4))
    rows = torch.arange(6.0).view(3, 2)

    async def main() -> None:
        node = fw.send_nowait(
            rows[1:], raw=wire.RawTensor.of(rows[1:]), layer=2, pos=0, step=0, sid="s",
            cid="c", history_rows=rows, history_pos=0,
        )  # fmt: skip
        assert node == "node-b"
        fw.outbox.flush_now()
        [(topic, payload)] = mesh.published
        msg = wire.decode(payload, max_bytes=1 << 20)
        assert topic == T.Topics("t").node_layer("m", 2, "node-b")
        assert isinstance(msg, wire.ActivationMessage)
        assert msg.to_tensor().tolist() == rows[1:].tolist()
        assert list(fw.custody.pending) == [msg.mid]  # held until node-b acknowledges
        assert fw.history.get("s", 0, 3) is None  # recorded once the loop turns
        await asyncio.sleep(0)
        assert fw.history.get("s", 0, 3).tolist() == rows.tolist()  # type: ignore[union-attr]

        fw.send_nowait(rows, layer=2, pos=0, step=0, sid="t", cid="c")
        fw.forget("t")  # freed before the loop turned: nothing is left behind
        await asyncio.sleep(0)
        assert fw.history.get("t", 0, 3) is None and "t" not in fw.history.rows

    asyncio.run(main())


def test_send_nowait_without_a_route_posts_and_records_nothing() -> None:
    fw, mesh = forwarder(("node-a", 0, 2))

    async def main() -> None:
        with pytest.raises(MeshError, match="layer 2 has no live node"):
            fw.send_nowait(torch.zeros(1, 2), layer=2, pos=0, step=0, sid="s", cid="c")
        fw.outbox.flush_now()
        await asyncio.sleep(0)
        assert mesh.published == [] and not fw.custody.pending and not fw.history.rows

    asyncio.run(main())
