"""Wire format: round trips, one rejection per invalid field, and decode fed arbitrary input."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jarvis_mqtt.errors import WireError
from jarvis_mqtt.topics import ClientId, MessageId, NodeId, SessionId, new_message_id
from jarvis_mqtt.wire import (
    BUNDLE_MAGIC,
    MAGIC,
    ActivationMessage,
    ErrorMessage,
    Message,
    RawTensor,
    ResultMessage,
    RouteHop,
    WireDecodeError,
    bundle,
    decode,
    encode,
    message_id,
    unbundle,
)

LIMIT = 1 << 20
MID = MessageId("0123456789abcdef0123456789abcdef")


def act(x: torch.Tensor, **kw: Any) -> ActivationMessage:
    fields: dict[str, Any] = {
        "sid": SessionId("s1"),
        "cid": ClientId("chat-1"),
        "model": "smollm2",
        "step": 3,
        "pos": 10,
        "layer": 4,
        "route": (RouteHop(NodeId("n0"), 0, 4, 1.5, 1.75),),
        "skipped": (2,),
        "meta": {"temperature": 0.7, "tags": ["a", 1, None, b"\x00"], "nested": {"k": True}},
        "mid": MID,
    }
    fields.update(kw)
    return ActivationMessage.from_tensor(x, **fields)


def raw(header: dict[str, Any], body: bytes = b"") -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return MAGIC + len(packed).to_bytes(4, "big") + packed + body


def valid_header() -> tuple[dict[str, Any], bytes]:
    payload = encode(act(torch.ones(2, 4)))
    hlen = int.from_bytes(payload[2:6], "big")
    return msgpack.unpackb(payload[6 : 6 + hlen]), payload[6 + hlen :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 8), (5, 16), (2, 3, 8)])
def test_tensor_round_trip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape).to(dtype)
    msg = act(x, pos=0 if len(shape) == 3 else 10)
    back = decode(encode(msg), max_bytes=LIMIT)
    assert back == msg and isinstance(back, ActivationMessage)
    y = back.to_tensor()
    assert y.dtype == dtype and y.shape == x.shape and torch.equal(y, x)
    assert back.n_tokens == shape[-2]


def test_result_and_error_round_trip() -> None:
    res = ResultMessage.from_tensor(
        torch.randn(3, 4), sid="s", cid="c", model="m", step=0, pos=0, layer=30
    )
    assert decode(encode(res), max_bytes=LIMIT) == res
    err = ErrorMessage(
        code="no_session", text="unknown s", cid=ClientId("c"), sid=SessionId("s"), ref=MID
    )
    back = decode(encode(err), max_bytes=LIMIT)
    assert back == err and isinstance(back, ErrorMessage)
    bare = ErrorMessage(code="bad_message", text="")
    assert decode(encode(bare), max_bytes=LIMIT) == bare


def test_zero_copy_both_ways() -> None:
    x = torch.zeros(2, 4)
    msg = act(x)
    x[0, 0] = 5.0  # from_tensor shares the tensor's memory
    payload = bytearray(encode(msg))
    back = decode(payload, max_bytes=LIMIT)
    assert isinstance(back, ActivationMessage)
    t = back.to_tensor()
    assert t[0, 0] == 5.0
    payload[-4:] = torch.tensor([9.0]).numpy().tobytes()  # to_tensor views the payload
    assert t[1, 3] == 9.0
    owned = back.to_tensor(copy=True)
    payload[-4:] = bytes(4)
    assert owned[1, 3] == 9.0 and t[1, 3] == 0.0


def test_message_id_peeks_without_decoding() -> None:
    payload = encode(act(torch.ones(1, 2)))
    assert message_id(payload) == MID
    assert message_id(b"hello") is None
    assert message_id(raw({"mid": "nothex"})) is None


def test_from_tensor_refuses_other_dtypes() -> None:
    with pytest.raises(WireError):
        act(torch.ones(2, 2, dtype=torch.int64))


BAD_FIELDS: list[tuple[str, Any]] = [
    ("v", 2),
    ("v", "1"),
    ("v", True),
    ("kind", "activation"),
    ("kind", ["act"]),
    ("mid", "nothex"),
    ("mid", MID.upper()),
    ("mid", bytes(16)),
    ("sid", "a/b"),
    ("sid", None),
    ("cid", ""),
    ("cid", 7),
    ("model", "m+"),
    ("step", -1),
    ("step", True),
    ("step", 1.0),
    ("step", 1 << 40),
    ("pos", [0]),
    ("pos", [-1, 2]),
    ("pos", [0, 3]),
    ("pos", 0),
    ("layer", -1),
    ("layer", 70000),
    ("layer", "4"),
    ("dtype", "int8"),
    ("dtype", None),
    ("dtype", ["float32"]),
    ("shape", [8]),
    ("shape", [1, 2, 2, 2]),
    ("shape", [2, 0]),
    ("shape", [2, 8]),  # twice the bytes the body has
    ("shape", [2, "4"]),
    ("shape", {"a": 1}),
    ("route", [["n", 0, 0, 1.0, 1.0]]),
    ("route", [["n", 0, 1, "t", 1.0]]),
    ("route", [["n", 0, 1, float("nan"), 1.0]]),
    ("route", [["a/b", 0, 1, 1.0, 1.0]]),
    ("route", [["n", 0, 1, 1.0]]),
    ("route", ["n"]),
    ("route", {}),
    ("skipped", [2, 1]),
    ("skipped", [1, 1]),
    ("skipped", [-1]),
    ("skipped", 3),
    ("meta", []),
    ("meta", {"a": msgpack.ExtType(5, b"x")}),
    ("meta", None),
]


@pytest.mark.parametrize(("key", "value"), BAD_FIELDS, ids=[f"{k}={v!r}" for k, v in BAD_FIELDS])
def test_each_invalid_field_is_a_wire_error(key: str, value: Any) -> None:
    header, body = valid_header()
    header[key] = value
    with pytest.raises(WireError):
        decode(raw(header, body), max_bytes=LIMIT)


@pytest.mark.parametrize("key", ["v", "kind", "mid", "sid", "cid", "pos", "shape", "meta"])
def test_missing_field(key: str) -> None:
    header, body = valid_header()
    del header[key]
    with pytest.raises(WireError, match=key if key not in ("v", "kind") else None):
        decode(raw(header, body), max_bytes=LIMIT)


def test_framing_errors() -> None:
    good = encode(act(torch.ones(2, 4)))
    header, body = valid_header()
    cases = {
        "empty": b"",
        "no magic": b"XX" + good[2:],
        "truncated prefix": good[:4],
        "header length past end": good[:2] + (1 << 30).to_bytes(4, "big") + good[6:],
        "truncated tensor": good[:-1],
        "extra tensor byte": good + b"\x00",
        "header not a map": raw([1, 2]),  # type: ignore[arg-type]
        "header bad msgpack": MAGIC + (1).to_bytes(4, "big") + b"\xc1",
        "unknown key": raw({**header, "extra": 1}, body),
        "int map key": MAGIC + b"\x00\x00\x00\x03" + b"\x81\x01\x02",
        "error with tensor": encode(ErrorMessage(code="x", text="y")) + b"\x00",
    }
    for name, payload in cases.items():
        with pytest.raises(WireError):
            decode(payload, max_bytes=LIMIT)
            pytest.fail(name)
    with pytest.raises(WireError, match="over the limit"):
        decode(good, max_bytes=len(good) - 1)
    with pytest.raises(WireError):
        decode("text", max_bytes=LIMIT)  # type: ignore[arg-type]


def test_error_carries_the_readable_ids() -> None:
    header, body = valid_header()
    header["dtype"] = "int4"
    with pytest.raises(WireDecodeError) as info:
        decode(raw(header, body), max_bytes=LIMIT)
    assert (info.value.mid, info.value.sid, info.value.cid) == (MID, "s1", "chat-1")
    assert "dtype" in str(info.value)
    header["cid"] = "bad/cid"
    with pytest.raises(WireDecodeError) as info:
        decode(raw(header, body), max_bytes=LIMIT)
    assert info.value.cid is None and info.value.sid == "s1"


def test_constructing_an_invalid_message_fails_at_the_sender() -> None:
    with pytest.raises(WireError):
        act(torch.ones(2, 2), sid="has space")
    with pytest.raises(WireError):
        ErrorMessage(code="x", text="y" * 5000)
    with pytest.raises(WireError):
        RouteHop(NodeId("n"), 3, 3, 0.0, 0.0)


# -- decode never fails with anything but WireError ------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
KEYS = ["v", "kind", "mid", "sid", "cid", "model", "step", "pos", "layer", "dtype", "shape"]
KEYS += ["route", "skipped", "meta", "ref", "code", "text"]


def check(payload: bytes) -> None:
    try:
        msg: Message = decode(payload, max_bytes=LIMIT)
    except WireError:
        return
    # Anything accepted is a valid message (bytes compared: meta may hold NaN).
    assert encode(decode(encode(msg), max_bytes=LIMIT)) == encode(msg)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_arbitrary_bytes(payload: bytes) -> None:
    check(payload)
    check(MAGIC + payload)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), values, max_size=16),
    body=st.binary(max_size=64),
)
def test_arbitrary_msgpack_maps(header: dict[str, Any], body: bytes) -> None:
    check(raw(header, body))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    changes=st.dictionaries(st.sampled_from(KEYS), values, min_size=1, max_size=3),
    kind=st.sampled_from(["act", "result", "error"]),
    cut=st.integers(0, 40),
)
def test_valid_headers_with_arbitrary_fields(changes: dict[str, Any], kind: str, cut: int) -> None:
    header, body = valid_header()
    if kind == "error":
        header = {"v": 1, "kind": "error", "mid": new_message_id(), "sid": None, "cid": "c"}
        header |= {"ref": None, "code": "x", "text": "t", "meta": {}}
        body = b""
    header["kind"] = kind
    header.update(changes)
    check(raw(header, body[: len(body) - cut] if cut else body))


def test_bundle_round_trip_and_a_lone_part_unwrapped() -> None:
    msgs = [act(torch.full((1, 4), float(i)), step=i) for i in range(3)]
    payloads = [encode(m) for m in msgs]
    assert bundle(payloads[:1]) == payloads[0]  # one message travels as it is
    assert [bytes(p) for p in unbundle(payloads[0])] == payloads[:1]
    packed = bundle([*payloads, b"", b"ack"])
    assert packed.startswith(BUNDLE_MAGIC)
    parts = unbundle(packed)
    assert [bytes(p) for p in parts] == [*payloads, b"", b"ack"]
    got = [decode(p, max_bytes=LIMIT) for p in parts[:3]]
    assert [m.step for m in got] == [0, 1, 2]  # type: ignore[union-attr]
    with pytest.raises(WireError):
        bundle([])


@pytest.mark.parametrize(
    "payload",
    [
        BUNDLE_MAGIC,  # no count
        BUNDLE_MAGIC + (0).to_bytes(4, "big"),  # empty
        BUNDLE_MAGIC + (2).to_bytes(4, "big") + (1).to_bytes(4, "big"),  # lengths cut short
        BUNDLE_MAGIC + (1).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"abc",  # body short
        BUNDLE_MAGIC + (1).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"ab",  # body long
        BUNDLE_MAGIC + (1 << 31).to_bytes(4, "big"),  # absurd count
    ],
)
def test_broken_bundles_are_wire_errors(payload: bytes) -> None:
    with pytest.raises(WireDecodeError):
        unbundle(payload)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_unbundle_arbitrary_bytes(payload: bytes) -> None:
    """Parts that exactly tile the payload, or a WireDecodeError; never anything else."""
    for data in (payload, BUNDLE_MAGIC + payload):
        try:
            parts = unbundle(data)
        except WireDecodeError:
            continue
        if data.startswith(BUNDLE_MAGIC):
            assert b"".join(parts) == data[len(data) - sum(len(p) for p in parts) :]
        else:
            assert [bytes(p) for p in parts] == [data]


def test_raw_tensor_rows_share_memory_and_build_the_same_message() -> None:
    t = torch.arange(12.0).view(4, 3)
    raw = RawTensor.of(t)
    assert (raw.dtype, raw.shape, raw.data.nbytes) == ("float32", (4, 3), 48)
    for start, stop in ((0, None), (1, 3), (-1, None)):
        part = raw.rows(start, stop)
        want = t[start:stop]
        got = torch.frombuffer(part.data, dtype=torch.float32).view(part.shape)
        assert got.tolist() == want.tolist()
    fields: dict[str, Any] = dict(sid="s", cid="c", model="m", step=0, pos=0, layer=1, mid="0" * 32)
    a = ActivationMessage.from_tensor(t[1:3], **fields)
    b = ActivationMessage.from_tensor(raw.rows(1, 3), **fields)
    assert encode(a) == encode(b)
    half = RawTensor.of(t.to(torch.bfloat16))  # numpy has no bfloat16: its bytes as int16
    assert (half.dtype, half.data.nbytes) == ("bfloat16", 24)
