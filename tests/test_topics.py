"""Topic names and payload codecs of the small topics: pure logic, no broker."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jarvis_mqtt import topics as T
from jarvis_mqtt.errors import ConfigError, WireError
from jarvis_mqtt.membership import NodeStatus
from jarvis_mqtt.topics import (
    ALL_SPECS,
    AckTopic,
    ClientId,
    ClientResultTopic,
    LayerTopic,
    NodeId,
    NodeStatusTopic,
    SessionFreeTopic,
    SessionId,
    Topics,
    is_message_id,
    is_name,
    new_client_id,
    new_message_id,
    new_session_id,
    pack_session_free,
    pack_status,
    unpack_session_free,
    unpack_status,
)

names = st.text(
    alphabet=st.characters(
        blacklist_characters="/+#$", blacklist_categories=("Cc", "Zs", "Zl", "Zp", "Cs")
    ),
    min_size=1,
    max_size=20,
).filter(is_name)


def test_builders_match_the_declared_patterns() -> None:
    t = Topics("jarvis")
    assert t.layer("smollm2", 7) == "jarvis/m/smollm2/layer/7"
    assert t.all_layers("smollm2") == "jarvis/m/smollm2/layer/+"
    assert t.session_free("smollm2") == "jarvis/m/smollm2/free"
    assert t.node_status(NodeId("pi-1")) == "jarvis/node/pi-1/status"
    assert t.all_node_status() == "jarvis/node/+/status"
    assert t.client_result(ClientId("chat-1")) == "jarvis/client/chat-1/result"
    fields = {"root": "R", "model": "M", "layer": 3, "node_id": "N", "client_id": "C", "name": "A"}
    built = {
        "R/m/M/layer/3": Topics("R").layer("M", 3),
        "R/m/M/layer/3/N": Topics("R").node_layer("M", 3, "N"),
        "R/m/M/free": Topics("R").session_free("M"),
        "R/node/N/status": Topics("R").node_status("N"),
        "R/client/C/result": Topics("R").client_result("C"),
        "R/ack/A": Topics("R").ack("A"),
        "R/assign/N": Topics("R").assign("N"),
        "R/file/N/get": Topics("R").file_get("N"),
        "R/file/A/data": Topics("R").file_data("A"),
    }
    assert {spec.pattern.format(**fields) for spec in ALL_SPECS} == set(built.values())
    # Only node statuses and assignments are retained.
    assert {s.pattern for s in ALL_SPECS if s.retained} == {
        "{root}/node/{node_id}/status",
        "{root}/assign/{node_id}",
    }


def test_parse_round_trip_and_multi_level_root() -> None:
    t = Topics("test/run-1")
    assert t.parse(t.layer("m", 0)) == LayerTopic("m", 0)
    assert t.parse(t.layer("m", 65535)) == LayerTopic("m", 65535)
    assert t.parse(t.node_layer("m", 2, "n")) == LayerTopic("m", 2, NodeId("n"))
    assert t.parse(t.session_free("m")) == SessionFreeTopic("m")
    assert t.parse(t.ack("node-1")) == AckTopic("node-1")
    assert t.parse(t.node_status("n")) == NodeStatusTopic(NodeId("n"))
    assert t.parse(t.client_result("c")) == ClientResultTopic(ClientId("c"))
    assert t.parse(t.file_get("n")) == T.FileGetTopic(NodeId("n"))
    assert t.parse(t.file_data("n.fetch")) == T.FileDataTopic("n.fetch")


@pytest.mark.parametrize(
    "topic",
    [
        "other/m/x/layer/1",
        "jarvis/m/x/layer/01",
        "jarvis/m/x/layer/-1",
        "jarvis/m/x/layer/1.0",
        "jarvis/m/x/layer/99999",
        "jarvis/m/x/layer/١",  # a non-ASCII digit
        "jarvis/m/x/layer",
        "jarvis/m//layer/1",
        "jarvis/node/n/status/extra",
        "jarvis/m/x/layer/1/n/extra",
        "jarvis/m/x/layer/1/+",
        "jarvis/client/c/results",
        "jarvis/m/+/free",
        "jarvis",
    ],
)
def test_parse_rejects_foreign_topics(topic: str) -> None:
    with pytest.raises(WireError):
        Topics("jarvis").parse(topic)


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "a b", "tab\t", "$SYS", "x" * 129, "\x00"])
def test_builders_reject_bad_names(bad: str) -> None:
    t = Topics()
    for build in (
        lambda: t.layer(bad, 1),
        lambda: t.node_layer("m", 1, bad),
        lambda: t.session_free(bad),
        lambda: t.node_status(bad),
        lambda: t.client_result(bad),
        lambda: Topics(bad.replace("/", "+")),  # a root may have levels, each a valid name
    ):
        with pytest.raises(ConfigError):
            build()


@pytest.mark.parametrize("root", ["", "/a", "a/", "a//b", "a/+/b", "a/#"])
def test_bad_roots(root: str) -> None:
    with pytest.raises(ConfigError):
        Topics(root)


@pytest.mark.parametrize("layer", [-1, 65536, True, 1.0])
def test_layer_numbers_are_checked(layer: object) -> None:
    with pytest.raises(ConfigError):
        Topics().layer("m", layer)  # type: ignore[arg-type]


@given(root=names, model=names, node=names, client=names, layer=st.integers(0, 65535))
def test_any_valid_name_round_trips(
    root: str, model: str, node: str, client: str, layer: int
) -> None:
    t = Topics(root)
    assert t.parse(t.layer(model, layer)) == LayerTopic(model, layer)
    assert t.parse(t.node_status(node)) == NodeStatusTopic(NodeId(node))
    assert t.parse(t.client_result(client)) == ClientResultTopic(ClientId(client))


def test_new_ids_are_valid_and_distinct() -> None:
    mids = {new_message_id() for _ in range(100)}
    assert len(mids) == 100 and all(map(is_message_id, mids))
    assert is_name(new_session_id()) and is_name(new_client_id("chat"))
    assert new_client_id("chat").startswith("chat-")


def test_session_free_payload() -> None:
    ids = [SessionId("s1"), SessionId("s2")]
    assert unpack_session_free(pack_session_free(ids)) == ids
    for bad in (b"\xc1", msgpack.packb({"a": 1}), msgpack.packb(["a/b"]), msgpack.packb([1])):
        with pytest.raises(WireError):
            unpack_session_free(bad)
    with pytest.raises(ConfigError):
        pack_session_free([SessionId("bad/id")])


def test_status_payload() -> None:
    s = NodeStatus(node_id="n1", model="m", start=0, end=4, time=12.5, capacity={"kv": 1})
    assert unpack_status(pack_status(s)) == s
    for bad in (
        b"",
        b"\x92\x01",
        msgpack.packb({"node_id": "a/b", "model": "m", "start": 0, "end": 1}),
    ):
        with pytest.raises(WireError):
            unpack_status(bad)


def test_ack_round_trip_and_validation() -> None:
    from jarvis_mqtt.topics import Ack, new_message_id, pack_ack, unpack_ack

    for need in (None, 0, 17):
        ack = Ack(new_message_id(), NodeId("n1"), need)
        assert unpack_ack(pack_ack(ack)) == ack
    for bad in (b"\xc1", msgpack.packb([1]), msgpack.packb({"mid": "x", "by": "n"})):
        with pytest.raises(WireError):
            unpack_ack(bad)
    with pytest.raises(WireError):
        unpack_ack(msgpack.packb({"mid": new_message_id(), "by": "n", "need_from": -1}))


def test_assignment_round_trip_and_validation() -> None:
    from jarvis_mqtt.topics import Assignment, pack_assignment, unpack_assignment

    a = Assignment((("smollm2", 0, 10), ("gemma3", 4, 9)), plan="p1")
    assert unpack_assignment(pack_assignment(a)) == a
    h = Assignment(a.spans, "p1", (("gemma3", "ab" * 32), ("smollm2", "cd" * 32)))
    assert unpack_assignment(pack_assignment(h)) == h and h.manifest("gemma3") == "ab" * 32
    assert h.manifest("other") is None
    assert unpack_assignment(pack_assignment(Assignment(()))) == Assignment(())
    for bad in (
        {"spans": [{"model": "m", "start": 5, "end": 5}]},
        {"spans": [{"model": "a/b", "start": 0, "end": 5}]},
        {"spans": [{"model": "m", "start": 0, "end": 5}, {"model": "m", "start": 5, "end": 9}]},
        {"spans": "nope"},
        {},
        {"spans": [], "manifests": {"m": "not-a-hash"}},
        {"spans": [], "manifests": {"a/b": "ab" * 32}},
        {"spans": [], "manifests": ["m"]},
    ):
        with pytest.raises(WireError):
            unpack_assignment(msgpack.packb(bad))


def test_file_request_and_chunk_round_trip_and_validation() -> None:
    rid = new_message_id()
    req = T.FileRequest(rid, "smollm2", "layer_004.safetensors", 262144, 262144, "dev1.fetch")
    assert T.unpack_file_request(T.pack_file_request(req)) == req
    chunk = T.FileChunk(rid, 262144, 9_000_000, b"\x00\xff" * 100)
    assert T.unpack_file_chunk(T.pack_file_chunk(chunk)) == chunk
    refused = T.FileChunk(rid, error="layer_004.safetensors: not here")
    assert T.unpack_file_chunk(T.pack_file_chunk(refused)) == refused
    good = T.pack_file_request(req)
    assert T.unpack_file_request(good).file == "layer_004.safetensors"
    fields = dict(msgpack.unpackb(good))
    for change in (
        {"file": "../../etc/passwd"},  # no climbing out of the model directory
        {"file": "a/b"},
        {"file": ".hidden"},
        {"file": ""},
        {"length": 0},
        {"length": T.MAX_FILE_CHUNK + 1},
        {"offset": -1},
        {"offset": True},
        {"rid": "x"},
        {"reply": "a/b"},
        {"model": "+"},
    ):
        with pytest.raises(WireError):
            T.unpack_file_request(msgpack.packb({**fields, **change}))
    with pytest.raises(WireError):
        T.unpack_file_request(b"\xc1")
    cfields = dict(msgpack.unpackb(T.pack_file_chunk(chunk)))
    for change in (
        {"data": "text"},
        {"data": bytes(T.MAX_FILE_CHUNK + 1)},
        {"size": -5},
        {"error": 3},
        {"rid": None},
    ):
        with pytest.raises(WireError):
            T.unpack_file_chunk(msgpack.packb({**cfields, **change}, use_bin_type=True))
