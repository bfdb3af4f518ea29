"""`jarvis inspect`: decoding every message kind and garbage, traces, node tables, and the
three commands against a real mesh of SmolLM2 (2 brokers, 3 nodes)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import io
import json
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from jarvis_mqtt import inspect as ins
from jarvis_mqtt import topics as T
from jarvis_mqtt import wire
from jarvis_mqtt.brokers import BrokerAddress
from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.client import RemoteModel
from jarvis_mqtt.errors import ConfigError
from jarvis_mqtt.inspect_decode import describe, format_record, matches, tensor_stats
from jarvis_mqtt.inspect_nodes import NodeBoard, coverage, node_rows, nodes_table
from jarvis_mqtt.inspect_trace import StepRoute, TraceBuilder, format_step
from jarvis_mqtt.membership import NodeStatus
from jarvis_mqtt.mesh import LocalMesh
from jarvis_mqtt.sampling import SamplingParams
from tests.fixtures_models import models_cache

ROOT = "jv"
TOPICS = T.Topics(ROOT)
SID = T.SessionId("sess1")
CID = T.ClientId("chat-1")
MODEL = "smol"
T0 = 1_700_000_000.0


def hop(node: str, start: int, end: int, t_in: float, t_out: float) -> wire.RouteHop:
    return wire.RouteHop(T.NodeId(node), start, end, T0 + t_in, T0 + t_out)


def act(
    layer: int = 10,
    *,
    x: torch.Tensor | None = None,
    cls: type[wire.TensorMessage] = wire.ActivationMessage,
    **kw: Any,
) -> Any:
    fields: dict[str, Any] = dict(sid=SID, cid=CID, model=MODEL, step=0, pos=0, layer=layer)
    fields.update(kw)
    return cls.from_tensor(torch.ones(3, 4) if x is None else x, **fields)


def result(route: tuple[wire.RouteHop, ...], **kw: Any) -> wire.ResultMessage:
    fields: dict[str, Any] = dict(layer=30, route=route, x=torch.ones(1, 4), cls=wire.ResultMessage)
    fields.update(kw)
    msg = act(**fields)
    assert isinstance(msg, wire.ResultMessage)
    return msg


def status(node: str = "node-1", **kw: Any) -> NodeStatus:
    fields: dict[str, Any] = dict(node_id=node, model=MODEL, start=10, end=20, time=T0, host="pi")
    fields |= dict(pid=42, capacity={"kv_budget_bytes": 1 << 29, "cores": 4})
    fields |= dict(load={"sessions": 2, "queue": 1, "kv_bytes": 3 << 20})
    fields.update(kw)
    return NodeStatus(**fields)


def strict_json(rec: dict[str, Any]) -> dict[str, Any]:
    """A record survives strict JSON (no NaN, no bytes) unchanged in meaning."""
    out: dict[str, Any] = json.loads(json.dumps(rec, allow_nan=False))
    return out


# -- decoding ------------------------------------------------------------------------------------


def test_activation_decodes_to_every_field() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4) - 5.0
    route = (hop("node-0", 0, 10, 0.0, 0.012),)
    msg = act(x=x, step=2, pos=7, route=route, skipped=(3, 4), meta={"allow_skip": True})
    payload = wire.encode(msg)
    rec = describe(
        TOPICS.node_layer(MODEL, 10, "node-1"), payload, root=ROOT, received=T0 + 1, broker="b:1"
    )
    assert rec["kind"] == "act" and rec["topic_kind"] == "layer"
    assert (rec["model"], rec["layer"], rec["to"], rec["broker"]) == (MODEL, 10, "node-1", "b:1")
    assert (rec["sid"], rec["cid"], rec["mid"]) == (SID, CID, msg.mid)
    assert (rec["step"], rec["pos"], rec["tokens"]) == (2, 7, 3)
    assert (rec["dtype"], rec["shape"]) == ("float32", [3, 4])
    assert rec["skipped"] == [3, 4] and rec["meta"] == {"allow_skip": True}
    assert rec["route"] == [
        {"node": "node-0", "start": 0, "end": 10, "t_in": T0, "t_out": T0 + 0.012, "ms": 12.0}
    ]
    assert rec["tensor_bytes"] == 48 and rec["header_bytes"] + 48 == rec["bytes"] == len(payload)
    s = rec["stats"]
    assert (s["min"], s["max"], s["mean"], s["nonfinite"]) == (-5.0, 6.0, 0.5, 0)
    assert s["std"] == pytest.approx(float(x.std(correction=0)))
    assert s["norm"] == pytest.approx(float(x.norm()))
    line = format_record(rec)
    assert line.startswith(time.strftime("%H:%M:%S", time.localtime(T0 + 1)))
    for part in (rec["topic"], " act ", "sid=sess1", "step=2", "pos=7+3", "layer=10"):
        assert part in line
    for part in ("float32[3,4]", "min=-5", "max=6", "node-0[0,10) 12.0ms", "skipped=3-4"):
        assert part in line
    assert "hdr=" in line and "tensor=48B" in line and strict_json(rec)["sid"] == SID


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tensors_summarised(dtype: torch.dtype) -> None:
    rec = describe(
        TOPICS.layer(MODEL, 0),
        wire.encode(act(0, x=torch.full((2, 4), 2.0, dtype=dtype))),
        root=ROOT,
    )
    assert rec["dtype"] == str(dtype).removeprefix("torch.")
    assert rec["stats"]["mean"] == 2.0 and rec["stats"]["std"] == 0.0


def test_nonfinite_values_are_counted_not_summarised() -> None:
    x = torch.tensor([[1.0, float("nan"), float("inf"), 3.0]])
    rec = describe(TOPICS.layer(MODEL, 1), wire.encode(act(1, x=x)), root=ROOT)
    assert rec["stats"]["nonfinite"] == 2 and rec["stats"]["max"] == 3.0
    assert "NONFINITE=2" in format_record(rec)
    assert tensor_stats(torch.tensor([float("nan")]))["mean"] is None
    strict_json(rec)


def test_result_and_error_on_the_client_topic() -> None:
    route = (hop("node-0", 0, 10, 0, 0.01), hop("node-1", 10, 30, 0.011, 0.02))
    rec = describe(TOPICS.client_result(CID), wire.encode(result(route, step=1)), root=ROOT)
    assert (rec["kind"], rec["client"], rec["step"], rec["layer"]) == ("result", CID, 1, 30)
    assert [h["node"] for h in rec["route"]] == ["node-0", "node-1"]
    assert "route=node-0[0,10) 10.0ms > node-1[10,30) 9.0ms" in format_record(rec)

    ref = T.new_message_id()
    err = wire.ErrorMessage(
        code="no_route", text="layer 12 has no live node", cid=CID, sid=SID, ref=ref,
        meta={"node": "node-1"},
    )  # fmt: skip
    rec = describe(TOPICS.client_result(CID), wire.encode(err), root=ROOT)
    assert (rec["kind"], rec["code"], rec["ref"], rec["sid"]) == ("error", "no_route", ref, SID)
    line = format_record(rec)
    assert "no_route: layer 12 has no live node" in line and f"ref={ref}" in line
    assert matches(rec, node="node-1") and strict_json(rec)


def test_status_free_and_ack() -> None:
    topic = TOPICS.node_status("node-1")
    rec = describe(topic, T.pack_status(status()), root=ROOT, retained=True, received=T0 + 2.5)
    assert rec["kind"] == "status" and rec["retained"] and rec["age"] == 2.5
    assert (rec["node"], rec["start"], rec["end"], rec["online"]) == ("node-1", 10, 20, True)
    assert rec["load"] == {"sessions": 2, "queue": 1, "kv_bytes": 3 << 20}
    line = format_record(rec)
    assert "status (retained)" in line and "[10,20) online" in line and "kv_bytes=3.0MiB" in line
    assert "age=2.5s" in line

    rec = describe(topic, T.pack_status(status(online=False)), root=ROOT)
    assert "OFFLINE" in format_record(rec)
    assert describe(topic, b"", root=ROOT, retained=True)["kind"] == "status-cleared"

    rec = describe(
        TOPICS.session_free(MODEL), T.pack_session_free([SID, T.SessionId("s2")]), root=ROOT
    )
    assert (rec["kind"], rec["sessions"], rec["model"]) == ("free", ["sess1", "s2"], MODEL)
    assert matches(rec, session="s2") and "sessions=sess1,s2" in format_record(rec)

    mid = T.new_message_id()
    ack = msgpack.packb({"mid": mid, "by": "node-2", "need_from": 5})
    rec = describe(f"{ROOT}/ack/node-1", ack, root=ROOT)
    assert (rec["kind"], rec["to"], rec["by"], rec["need_from"]) == ("ack", "node-1", "node-2", 5)
    assert "need_from=5" in format_record(rec)


def _header_of(payload: bytes) -> dict[str, Any]:
    hlen = int.from_bytes(payload[2:6], "big")
    out: dict[str, Any] = msgpack.unpackb(payload[6 : 6 + hlen])
    return out


def _jv(header: dict[str, Any], body: bytes = b"") -> bytes:
    h = msgpack.packb(header, use_bin_type=True)
    return b"JV" + len(h).to_bytes(4, "big") + h + body


GOOD = wire.encode(act(4))
GARBAGE = {
    "random bytes": b"\x00\xff\x13garbage",
    "empty": b"",
    "truncated prefix": b"JV\x00",
    "header length past the end": b"JV\x00\x00\x10\x00\x81",
    "header not msgpack": b"JV\x00\x00\x00\x04\xc1\xc1\xc1\xc1",
    "header not a map": _jv([1, 2, 3]),  # type: ignore[arg-type]
    "unknown version": _jv({**_header_of(GOOD), "v": 99}, GOOD[-48:]),
    "tensor cut short": GOOD[:-5],
    "bad dtype": _jv({**_header_of(GOOD), "dtype": "int8"}, GOOD[-48:]),
}


@pytest.mark.parametrize("case", GARBAGE)
def test_garbage_on_a_layer_topic_is_shown_not_fatal(case: str) -> None:
    payload = GARBAGE[case]
    rec = describe(TOPICS.node_layer(MODEL, 4, "node-0"), payload, root=ROOT)
    assert rec["kind"] == "undecodable" and rec["error"]
    assert rec["hex"] == payload[:32].hex() and rec["bytes"] == len(payload)
    line = format_record(rec)
    assert "undecodable" in line and f"{len(payload)} B" in line
    strict_json(rec)


def test_garbage_keeps_what_can_be_read_of_a_header() -> None:
    rec = describe(TOPICS.layer(MODEL, 4), GARBAGE["unknown version"], root=ROOT)
    assert rec["header"]["v"] == 99 and rec["sid"] == SID and rec["step"] == 0
    assert "wire version 99 unsupported" in rec["error"] and "sid=sess1" in format_record(rec)


def test_bad_status_and_foreign_topics() -> None:
    rec = describe(TOPICS.node_status("n"), b"\xc1", root=ROOT)
    assert rec["kind"] == "undecodable" and rec["node"] == "n"
    rec = describe(TOPICS.node_status("n"), msgpack.packb({"node_id": "n"}), root=ROOT)
    assert rec["kind"] == "undecodable" and "bad node status" in rec["error"]
    assert describe(f"{ROOT}/ack/x", b"\x01", root=ROOT)["kind"] == "undecodable"
    bad_need = msgpack.packb({"mid": T.new_message_id(), "by": "n", "need_from": "x"})
    assert describe(f"{ROOT}/ack/x", bad_need, root=ROOT)["kind"] == "undecodable"
    rec = describe("other/thing", msgpack.packb({"a": b"\x01", "k": float("nan")}), root=ROOT)
    assert rec["kind"] == "msgpack" and rec["value"] == {"a": "01", "k": "nan"}
    rec = describe(f"{ROOT}/whatever", b"hello", root=ROOT)
    assert (rec["kind"], rec["value"], rec["topic_kind"]) == ("text", "hello", "other")
    assert describe("x", b"\xff\xfe\xc1", root=ROOT)["kind"] == "undecodable"
    assert describe("x", b"", root=ROOT)["kind"] == "empty"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    topic=st.sampled_from(
        [
            TOPICS.layer(MODEL, 3),
            TOPICS.client_result(CID),
            TOPICS.node_status("n"),
            TOPICS.session_free(MODEL),
            f"{ROOT}/ack/n",
            "elsewhere/x",
        ]
    ),
    body=st.binary(max_size=120),
    jv=st.booleans(),
)
def test_describe_never_raises_and_is_always_strict_json(topic: str, body: bytes, jv: bool) -> None:
    payload = b"JV" + body if jv else body
    rec = describe(topic, payload, root=ROOT, received=T0)
    assert rec["kind"] and rec["topic"] == topic
    strict_json(rec)
    format_record(rec)


def test_filters() -> None:
    route = (hop("node-0", 0, 10, 0, 0.01),)
    rec = describe(TOPICS.node_layer(MODEL, 10, "node-1"), wire.encode(act(route=route)), root=ROOT)
    assert matches(rec) and matches(rec, model=MODEL, session=SID)
    assert matches(rec, node="node-1") and matches(rec, node="node-0")  # addressed, and came from
    assert not matches(rec, node="node-2") and not matches(rec, model="other")
    assert not matches(rec, session="other")
    st_rec = describe(TOPICS.node_status("node-1"), T.pack_status(status()), root=ROOT)
    assert matches(st_rec, node="node-1", model=MODEL) and not matches(st_rec, session=SID)


# -- traces --------------------------------------------------------------------------------------

THREE_HOPS = (
    hop("node-0", 0, 10, 0.000, 0.010),
    hop("node-1", 10, 20, 0.012, 0.025),
    hop("node-2", 20, 30, 0.026, 0.040),
)


def feed_step(b: TraceBuilder, step: int, pos: int, n: int = 1) -> list[StepRoute]:
    """The messages of one normal step: three activations, then the result."""
    x = torch.ones(n, 4)
    out: list[StepRoute] = []
    for i, layer in enumerate((0, 10, 20)):
        m = act(layer, x=x, step=step, pos=pos, route=THREE_HOPS[:i])
        out += b.add(m, to=f"node-{i}", received=T0 + i)
    return out + b.add(result(THREE_HOPS, step=step, pos=pos + n - 1), received=T0 + 3)


def test_trace_folds_a_step_into_its_route_with_times() -> None:
    b = TraceBuilder(SID)
    done = feed_step(b, 0, 0, n=5)
    assert len(done) == 1
    d = done[0].to_dict()
    assert (d["step"], d["status"], d["pos"], d["tokens"], d["replay"]) == (0, "done", 0, 5, False)
    assert [(h["node"], h["start"], h["end"]) for h in d["hops"]] == [
        ("node-0", 0, 10), ("node-1", 10, 20), ("node-2", 20, 30),
    ]  # fmt: skip
    assert [h["compute_ms"] for h in d["hops"]] == [10.0, 13.0, 14.0]
    assert [h["transfer_ms"] for h in d["hops"]] == [None, 2.0, 1.0]
    assert (d["compute_ms"], d["transfer_ms"], d["total_ms"]) == (37.0, 3.0, 40.0)
    text = format_step(d)
    assert "step 0  done  pos 0 (+5)  total 40.0 ms" in text and "REPLAY" not in text
    assert "node-1" in text and "transfer     2.00 ms" in text
    assert feed_step(b, 1, 5)[0].step == 1 and not b.unfinished()
    assert [r.step for r in b.routes()] == [0, 1]
    json.dumps(d, allow_nan=False)


def test_trace_marks_skipped_layers() -> None:
    b = TraceBuilder(SID)
    hops = (hop("node-0", 0, 10, 0, 0.01), hop("node-2", 12, 30, 0.011, 0.02))
    b.add(act(0, skipped=()), to="node-0")
    b.add(act(12, route=hops[:1], skipped=(10, 11)), to="node-2")
    (st,) = b.add(result(hops, skipped=(10, 11)))
    d = st.to_dict()
    assert d["skipped"] == [10, 11] and not d["replay"]
    assert "skipped layers 10-11" in format_step(d)


def test_trace_marks_a_gap_nobody_explained() -> None:
    hops = (hop("node-0", 0, 10, 0, 0.01), hop("node-2", 12, 30, 0.011, 0.02))
    (st,) = TraceBuilder(SID).add(result(hops))
    assert "MISSING layers 10-11" in format_step(st.to_dict())


def test_trace_replay_by_meta_then_replayed_result() -> None:
    b = TraceBuilder(SID)
    feed_step(b, 0, 0, n=4)
    b.add(act(0, step=1, pos=4), to="node-0")
    missed = act(10, step=1, pos=4, route=THREE_HOPS[:1])
    b.add(missed, to="node-1b")  # a replica without the session's cache asks for a replay
    assert b.ack(T.new_message_id(), "node-1b", 0) is None  # not this session's message
    assert b.ack(missed.mid, "node-1b", None) is None  # a plain acknowledgement
    assert b.ack(missed.mid, "node-1b", 0) is b.steps[1]
    # node-0 replays the session to node-1b: positions 0..4, meta replay.
    replay = act(
        10, x=torch.ones(5, 4), step=1, pos=0, route=THREE_HOPS[:1],
        meta={"replay": True, "emit_from": 4},
    )  # fmt: skip
    assert b.add(replay, to="node-1b") == []
    b.add(act(20, step=1, pos=4, route=THREE_HOPS[:2], meta={"replayed": ["node-1b"]}), to="node-2")
    (st,) = b.add(result(THREE_HOPS, step=1, pos=4, meta={"replayed": ["node-1b"]}))
    d = st.to_dict()
    assert d["replay"] and d["replayed_on"] == ["node-1b"] and d["status"] == "done"
    assert [r["why"] for r in d["replays"]] == ["meta"]
    assert (d["pos"], d["tokens"]) == (4, 3)  # the step's own positions, not the replay's
    assert (d["replays"][0]["node"], d["replays"][0]["pos"]) == ("node-1b", 0)
    text = format_step(d)
    assert "REPLAY(meta,replayed)" in text and "cache rebuilt by replay on node-1b" in text
    assert d["replay_requests"] == [{"by": "node-1b", "need_from": 0}]
    assert "node-1b asked for a replay from position 0" in text


def test_trace_replay_by_resend_position_and_second_result() -> None:
    b = TraceBuilder(SID)
    feed_step(b, 0, 0, n=4)
    b.add(act(0, step=1, pos=4), to="node-0")
    b.add(act(10, step=1, pos=4, route=THREE_HOPS[:1]), to="node-1")
    b.add(act(10, step=1, pos=4, route=THREE_HOPS[:1]), to="node-1b")  # node-1 died: re-sent
    (st,) = b.add(result(THREE_HOPS, step=1, pos=4))
    assert [r["why"] for r in st.replays] == ["resend"] and st.replays[0]["node"] == "node-1b"
    # The same step's result again (the original went through after all): shown again.
    (again,) = b.add(result(THREE_HOPS, step=1, pos=4))
    assert again is st and [r["why"] for r in st.replays] == ["resend", "result"]
    # A later step feeding positions an earlier one already covered.
    b.add(act(0, step=2, pos=2, x=torch.ones(3, 4)), to="node-0")
    assert [r["why"] for r in b.steps[2].replays] == ["position"]
    assert b.steps[2].pos is None and [s.step for s in b.unfinished()] == [2]
    d = b.steps[2].to_dict()
    assert d["waiting_at"] == {"layer": 0, "node": "node-0"}
    assert "waiting at layer 0 on node-0" in format_step(d)


def test_trace_errors_ignores_other_sessions_and_out_of_order() -> None:
    b = TraceBuilder(SID)
    err = wire.ErrorMessage(code="no_route", text="layer 12", cid=CID, sid=SID)
    (orphan,) = b.add(err)
    assert orphan.step is None and orphan.status == "error"
    assert b.add(act(0, sid=T.SessionId("other")), to="node-0") == []
    assert b.add(wire.ErrorMessage(code="x", text="y", cid=CID), to=None) == []
    b.add(act(0, step=0), to="node-0")
    (st,) = b.add(err)
    assert (
        st.step == 0 and st.status == "error" and "no_route: layer 12" in format_step(st.to_dict())
    )
    # The result can arrive before an earlier hop's activation (two brokers): route stays whole.
    b2 = TraceBuilder(SID)
    (done,) = b2.add(result(THREE_HOPS))
    assert b2.add(act(10, route=THREE_HOPS[:1]), to="node-1") == []
    assert done.hops == THREE_HOPS and done.status == "done"


# -- nodes ---------------------------------------------------------------------------------------


def test_node_rows_states_and_table() -> None:
    board = NodeBoard()
    board.add("node-0", T.pack_status(status("node-0", start=0, end=10, time=T0 + 9)))
    board.add("node-1", T.pack_status(status("node-1", time=T0)))  # heartbeat 10 s old
    board.add("node-2", T.pack_status(status("node-2", start=20, end=30, online=False)))
    board.add("node-3", b"\xc1")
    board.add("gone", T.pack_status(status("gone")))
    board.add("gone", b"")  # retained status cleared
    rows = node_rows(board, now=T0 + 10)
    assert [(r["node"], r["state"]) for r in rows] == [
        ("node-3", "invalid"), ("node-0", "online"), ("node-1", "stale"), ("node-2", "offline"),
    ]  # fmt: skip
    r0 = rows[1]
    assert (r0["start"], r0["end"], r0["age"], r0["sessions"], r0["queue"]) == (0, 10, 1.0, 2, 1)
    assert (r0["kv_bytes"], r0["host"], r0["pid"]) == (3 << 20, "pi", 42)
    assert coverage(rows) == {MODEL: "0-9"}
    json.dumps(rows, allow_nan=False)
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(nodes_table(rows, "t"))
    text = console.export_text()
    for part in ("node-0", "[0,10)", "stale", "offline", "invalid", "kv 512M 4c", "1.0s"):
        assert part in text
    assert "smol: layers 0-9 online" in text


# -- command line --------------------------------------------------------------------------------


def jarvis_parser() -> argparse.ArgumentParser:
    """A parser shaped like `jarvis`'s, with `register` called as cli.py will call it."""
    p = argparse.ArgumentParser(prog="jarvis")
    ins.register(p.add_subparsers(dest="cmd", required=True))
    return p


def test_register_adds_inspect_and_the_nodes_alias() -> None:
    p = jarvis_parser()
    a = p.parse_args(["inspect", "nodes", "--json", "--broker", "h:1,h:2", "--topic-root", "r/x"])
    assert (a.inspect_cmd, a.json, a.watch, a.func) == ("nodes", True, False, ins.run)
    conn = ins.connection_from_args(a)
    assert conn.brokers == (BrokerAddress("h", 1), BrokerAddress("h", 2)) and conn.root == "r/x"
    a = p.parse_args(["nodes", "--watch", "--broker", "h"])
    assert (a.cmd, a.inspect_cmd, a.watch) == ("nodes", "nodes", True)
    a = p.parse_args(["inspect", "tail", "r/#", "--session", "s", "--count", "3", "--json"])
    assert (a.inspect_cmd, a.filter, a.session, a.count, a.json) == ("tail", "r/#", "s", 3, True)
    a = p.parse_args(["inspect", "trace", "abc", "--count", "2", "--username", "u"])
    assert (a.inspect_cmd, a.session, a.count, a.username) == ("trace", "abc", 2, "u")
    with pytest.raises(SystemExit):
        p.parse_args(["inspect", "tail", "--count", "-1"])
    with pytest.raises(ConfigError):
        ins.connection_from_args(p.parse_args(["nodes", "--broker", "h", "--topic-root", "a/+"]))


def test_credentials_reach_meshclient_only_when_given(monkeypatch: pytest.MonkeyPatch) -> None:
    import jarvis_mqtt.transport as transport

    real = transport.MeshClient
    seen: dict[str, Any] = {}

    class Modern:
        def __init__(
            self, brokers: Any, *, client_id: str, connect_timeout: float,
            username: str | None = None, password: str | None = None, tls_ca: str | None = None,
            tls_cert: str | None = None, tls_key: str | None = None, tls_insecure: bool = False,
        ) -> None:  # fmt: skip
            seen.update(
                {k: v for k, v in locals().items() if k.startswith(("user", "pass", "tls"))}
            )

    class Older:
        def __init__(self, brokers: Any, *, client_id: str, connect_timeout: float) -> None:
            seen.update(older=True)

    brokers = (BrokerAddress("h"),)
    monkeypatch.setattr(transport, "MeshClient", Modern)
    a = jarvis_parser().parse_args(
        ["nodes", "--broker", "h", "--username", "u", "--password", "p", "--tls-ca", "/ca.pem",
         "--tls-insecure"]
    )  # fmt: skip
    ins.mesh_client(ins.connection_from_args(a))
    assert (seen["username"], seen["password"], seen["tls_ca"]) == ("u", "p", "/ca.pem")
    assert (seen["tls_cert"], seen["tls_key"], seen["tls_insecure"]) == (None, None, True)
    monkeypatch.setattr(transport, "MeshClient", Older)
    conn = ins.connection_from_args(jarvis_parser().parse_args(["nodes", "--broker", "h"]))
    ins.mesh_client(conn)  # nothing given: works on a MeshClient without these keywords
    assert seen.get("older")
    with pytest.raises(ConfigError, match="--username, --tls-ca"):
        ins.mesh_client(ins.Connection(brokers=brokers, username="u", tls_ca="/ca.pem"))
    monkeypatch.setattr(transport, "MeshClient", real)
    if "username" in inspect.signature(real).parameters:  # the MeshClient of this checkout
        client = ins.mesh_client(ins.Connection(brokers=brokers, username="u", password="p"))
        assert (client.auth.username, client.auth.password) == ("u", "p")


def test_default_broker_is_the_local_mesh_state(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = jarvis_parser()
    monkeypatch.setenv("JARVIS_RUN", str(tmp_path))
    conn = ins.connection_from_args(p.parse_args(["nodes"]))
    assert conn.brokers == (ins.FALLBACK_BROKER,) and conn.root == "jarvis"
    mesh = LocalMesh("m", run_dir=tmp_path, topic_root="t/abc")
    mesh.save()
    (tmp_path / "state.json").write_text(
        json.dumps(
            {
                **mesh.state(),
                "brokers": [{"host": "127.0.0.1", "port": 1999, "pid": 1, "run_dir": "x"}],
            }
        )
    )
    conn = ins.connection_from_args(p.parse_args(["nodes"]))
    assert conn.brokers == (BrokerAddress("127.0.0.1", 1999),) and conn.root == "t/abc"


# -- against a real mesh -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh3(smollm2_dir: ModelDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """Two brokers and three nodes of SmolLM2 under a unique topic root."""
    mesh = LocalMesh(
        smollm2_dir.name, nodes=3, brokers=2, run_dir=tmp_path_factory.mktemp("inspect-mesh"),
        models_dir=models_cache(), topic_root=f"test/{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()


def inspect_cmd(mesh: LocalMesh, *args: str) -> list[str]:
    conn = ["--broker", mesh.broker_arg, "--topic-root", mesh.topic_root]
    return [sys.executable, "-m", "jarvis_mqtt.inspect", *args, *conn]


def wait_stderr_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> None:
    """Block until the process writes a stderr line starting with `prefix`."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([proc.stderr], [], [], left)
        if ready:
            line = proc.stderr.readline()
            if line.startswith(prefix):
                return
            if not line:
                break
            seen.append(line)
    raise AssertionError(f"no {prefix!r} line; stderr: {''.join(seen)}")


EXPECTED_SPANS = [("node-0", 0, 10), ("node-1", 10, 20), ("node-2", 20, 30)]


@pytest.mark.slow
@pytest.mark.integration
def test_nodes_json_lists_the_mesh(mesh3: LocalMesh, capsys: pytest.CaptureFixture[str]) -> None:
    out = subprocess.run(
        inspect_cmd(mesh3, "nodes", "--json"), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["node"], r["start"], r["end"]) for r in rows] == EXPECTED_SPANS
    assert {r["state"] for r in rows} == {"online"} and {r["model"] for r in rows} == {
        "smollm2-135m"
    }
    assert all(0 <= r["age"] < 5 and r["pid"] == mesh3.node(r["node"]).pid for r in rows)
    assert all(r["sessions"] is not None and r["capacity"]["kv_budget_bytes"] > 0 for r in rows)
    # The same through the parser cli.py builds, in this process, as a table.
    a = jarvis_parser().parse_args(["nodes", "--broker", mesh3.broker_arg, "--topic-root",
                                    mesh3.topic_root])  # fmt: skip
    assert a.func(a) == 0
    table = capsys.readouterr().out
    assert all(n in table for n, _, _ in EXPECTED_SPANS) and "layers 0-29 online" in table


@pytest.mark.slow
@pytest.mark.integration
def test_tail_and_trace_follow_a_generation(smollm2_dir: ModelDir, mesh3: LocalMesh) -> None:
    sid = f"s{uuid.uuid4().hex[:10]}"
    tok = smollm2_dir.tokenizer()
    prompt = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
        add_special_tokens=False,
    )
    steps = 4
    trace = subprocess.Popen(
        inspect_cmd(mesh3, "trace", sid, "--json", "--count", str(steps)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    conn = ins.Connection(brokers=tuple(mesh3.addresses), root=mesh3.topic_root)
    records: list[dict[str, Any]] = []

    async def tail(ready: asyncio.Event, complete: asyncio.Event) -> None:
        async with contextlib.aclosing(ins.tail_records(conn, on_ready=ready.set)) as recs:
            async for rec in recs:
                records.append(rec)
                if seen_all():
                    complete.set()

    def seen_all() -> bool:
        results = {r["step"] for r in records if r["kind"] == "result" and r["sid"] == sid}
        freed = any(r["kind"] == "free" and sid in r["sessions"] for r in records)
        return results == set(range(steps)) and freed

    async def scenario() -> int:
        ready, complete = asyncio.Event(), asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tailing = tg.create_task(tail(ready, complete), name="tail")
            await asyncio.wait_for(ready.wait(), 10)
            async with RemoteModel(smollm2_dir, mesh3.addresses, topic_root=mesh3.topic_root) as rm:
                await rm.wait_ready(30)
                params = SamplingParams(max_new_tokens=steps)
                n = len([e async for e in rm.generate(prompt, params, session=sid)])
            await asyncio.wait_for(complete.wait(), 10)  # the inspector's copies land too
            tailing.cancel()
        return n

    try:
        wait_stderr_line(trace, "# trace", 30)
        assert asyncio.run(scenario()) == steps
        out, err = trace.communicate(timeout=30)
    finally:
        if trace.poll() is None:
            trace.kill()
            trace.wait()
    assert trace.returncode == 0, err

    # tail: every kind decoded, nothing undecodable, the session's messages where they belong.
    kinds = {r["kind"] for r in records}
    assert {"status", "act", "result", "free"} <= kinds and "undecodable" not in kinds, kinds
    mine = [r for r in records if r.get("sid") == sid]
    acts = sorted((r["step"], r["layer"], r["to"]) for r in mine if r["kind"] == "act")
    assert acts == [(s, layer, n) for s in range(steps) for n, layer, _ in EXPECTED_SPANS]
    assert all(r["stats"]["norm"] > 0 and r["stats"]["nonfinite"] == 0 for r in mine)
    assert all(
        r["shape"] == [1 if r["step"] else len(prompt), 576] for r in mine if r["kind"] == "act"
    )
    assert {r["client"] for r in mine if r["kind"] == "result"} == {r["cid"] for r in mine}

    # trace: one route per step, through every layer in order, non-negative transfers.
    routes = [json.loads(line) for line in out.splitlines()]
    assert [r["step"] for r in routes] == list(range(steps))
    for r in routes:
        assert r["status"] == "done" and not r["replay"] and r["skipped"] == []
        assert [(h["node"], h["start"], h["end"]) for h in r["hops"]] == EXPECTED_SPANS
        assert all(h["compute_ms"] >= 0 for h in r["hops"])
        assert all(h["transfer_ms"] >= 0 for h in r["hops"][1:])
    assert [(r["pos"], r["tokens"]) for r in routes] == [(0, len(prompt))] + [
        (len(prompt) + k - 1, 1) for k in range(1, steps)
    ]
