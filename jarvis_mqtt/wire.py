"""The versioned wire format: a msgpack header and the raw tensor bytes in one MQTT payload.

Layout: `b"JV"`, a 4-byte big-endian header length, the msgpack header map, then the tensor
bytes in C order (none for errors). Header keys: `v` (format version), `kind` (`act`, `result`,
`error`), `mid` (message id, the duplicate-suppression key), `sid`, `cid`, `model`, `step`,
`pos` ([first token position, tokens]), `layer` (where the receiver starts), `dtype`, `shape`,
`route` ([node, start, end, t_in, t_out] per hop), `skipped` (layers bypassed), `meta`.
Messages validate themselves on construction, so a bad message fails at the sender too.

A *bundle* carries several payloads for one topic in one MQTT message (a node passing on a wave
of sessions, or acknowledging it): `b"JB"`, a 4-byte big-endian count, a 4-byte length per
part, then the parts. One part travels as it is, unwrapped.
"""

from __future__ import annotations

import itertools
import math
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import msgpack
import torch

from jarvis_mqtt.errors import WireError
from jarvis_mqtt.topics import (
    MAX_LAYER,
    ClientId,
    MessageId,
    NodeId,
    SessionId,
    is_message_id,
    is_name,
    new_message_id,
)

VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
MAGIC = b"JV"
PREFIX_BYTES = len(MAGIC) + 4
BUNDLE_MAGIC = b"JB"
MAX_BUNDLE_PARTS = 4096
MAX_HEADER_BYTES = 1 << 20  # a route of thousands of hops still fits
MAX_DIM = 1 << 31  # elements along one tensor dimension
MAX_STEP = 1 << 31  # generation steps of one session
MAX_POS = 1 << 31  # token position in one session
MAX_TEXT = 4096  # characters of an error text
MAX_META_DEPTH = 8  # nesting of the free `meta` map
DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {name: dtype.itemsize for name, dtype in DTYPES.items()}
_HEADER_KEYS = {
    "act": {"v", "kind", "mid", "sid", "cid", "model", "step", "pos", "layer", "dtype", "shape"}
    | {"route", "skipped", "meta"},
    "error": {"v", "kind", "mid", "sid", "cid", "ref", "code", "text", "meta"},
}
_HEADER_KEYS["result"] = _HEADER_KEYS["act"]

# torch warns once per process about tensors over read-only buffers, and ours are such views by
# design: spend that one warning here, silenced, instead of in a caller's first decode.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.frombuffer(b"\0", dtype=torch.uint8)


class WireDecodeError(WireError):
    """A payload that failed to decode; carries the ids that could be read, to answer the sender."""

    def __init__(
        self,
        text: str,
        *,
        mid: MessageId | None = None,
        sid: SessionId | None = None,
        cid: ClientId | None = None,
    ) -> None:
        super().__init__(text)
        self.mid, self.sid, self.cid = mid, sid, cid


@dataclass(frozen=True)
class RawTensor:
    """A tensor as the wire carries it: dtype name, shape and C-order bytes, a view of the
    tensor's memory. Rows slice without torch: a node takes this form of its results on the
    worker thread, right after the forward, and the event loop builds messages from it without
    touching torch (whose first call after a wait costs tens of µs of cold caches)."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Self:
        """The bytes of a tensor (copied only when it is not a contiguous CPU tensor)."""
        if tensor.dtype not in _DTYPE_NAMES:
            raise WireError(f"cannot send a tensor of {tensor.dtype}; use one of {sorted(DTYPES)}")
        t = tensor
        if t.requires_grad or t.device.type != "cpu" or not t.is_contiguous():
            t = t.detach().to("cpu").contiguous()
        # numpy has no bfloat16: view the same bytes as int16 to reach the buffer.
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        return cls(_DTYPE_NAMES[t.dtype], tuple(t.shape), raw.numpy().data.cast("B"))

    def rows(self, start: int, stop: int | None = None) -> RawTensor:
        """Rows `[start:stop]` (Python slice rules) of a 2-D tensor, sharing its memory."""
        if len(self.shape) != 2:
            raise WireError(f"rows of a {len(self.shape)}-D tensor")
        first, last, _ = slice(start, stop).indices(self.shape[0])
        last = max(first, last)
        row = self.shape[1] * _ITEMSIZE[self.dtype]
        return RawTensor(
            self.dtype, (last - first, self.shape[1]), self.data[first * row : last * row]
        )


@dataclass(frozen=True)
class RouteHop:
    """One node an activation went through: layers `[start, end)`, wall-clock in and out."""

    node: NodeId
    start: int
    end: int
    t_in: float  # seconds since the epoch, when the node received the message
    t_out: float  # seconds since the epoch, when it sent the result on

    def __post_init__(self) -> None:
        if not is_name(self.node):
            raise WireDecodeError(f"route hop node {self.node!r} is not a valid name")
        if not (_in(self.start, 0, MAX_LAYER) and _in(self.end, self.start + 1, MAX_LAYER + 1)):
            raise WireDecodeError(f"route hop span [{self.start!r}, {self.end!r}) is malformed")
        for name in ("t_in", "t_out"):
            t = getattr(self, name)
            if not (isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)):
                raise WireDecodeError(f"route hop {name} {t!r} is not a finite number")
            object.__setattr__(self, name, float(t))

    def to_list(self) -> list[Any]:
        """Compact form for the header."""
        return [self.node, self.start, self.end, self.t_in, self.t_out]


@dataclass(frozen=True, kw_only=True)
class TensorMessage:
    """Hidden states of one session: `shape` is (tokens, hidden) or (batch, tokens, hidden)."""

    KIND: ClassVar[str]
    sid: SessionId
    cid: ClientId  # where the result (or an error) goes
    model: str
    step: int  # generation step of the session, 0 for the prompt
    pos: int  # position of the first token in the session
    layer: int  # first layer the receiver runs (for results: layers done)
    dtype: str
    shape: tuple[int, ...]
    data: bytes | bytearray | memoryview  # raw tensor bytes in C order; kept as a memoryview
    route: tuple[RouteHop, ...] = ()
    skipped: tuple[int, ...] = ()  # layers bypassed so far, increasing
    meta: Mapping[str, Any] = field(default_factory=dict)
    mid: MessageId = field(default_factory=new_message_id)

    def __post_init__(self) -> None:
        ids = _check_ids(self.mid, self.sid, self.cid, required=True)
        if not is_name(self.model):
            raise _bad(f"model {self.model!r} is not a valid name", ids)
        if not _in(self.step, 0, MAX_STEP):
            raise _bad(f"step {self.step!r} is not an int in [0, {MAX_STEP})", ids)
        if not _in(self.pos, 0, MAX_POS):
            raise _bad(f"pos {self.pos!r} is not an int in [0, {MAX_POS})", ids)
        if not _in(self.layer, 0, MAX_LAYER + 1):
            raise _bad(f"layer {self.layer!r} is not an int in [0, {MAX_LAYER}]", ids)
        if not (isinstance(self.dtype, str) and self.dtype in DTYPES):
            raise _bad(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}", ids)
        shape = self.shape
        if not (
            isinstance(shape, list | tuple)
            and len(shape) in (2, 3)
            and all(_in(d, 1, MAX_DIM) for d in shape)
        ):
            raise _bad(f"shape {shape!r} is not 2 or 3 positive dimensions", ids)
        view = _byte_view(self.data)
        if view is None:
            raise _bad("tensor data is not a contiguous bytes-like object", ids)
        want = math.prod(shape) * DTYPES[self.dtype].itemsize
        if view.nbytes != want:
            raise _bad(
                f"tensor has {view.nbytes} bytes but shape {list(shape)} of {self.dtype} "
                f"needs {want}",
                ids,
            )
        if not (
            isinstance(self.route, list | tuple)
            and all(isinstance(h, RouteHop) for h in self.route)
        ):
            raise _bad("route is not a list of hops", ids)
        skipped = self.skipped
        if not (
            isinstance(skipped, list | tuple)
            and all(_in(i, 0, MAX_LAYER) for i in skipped)
            and all(a < b for a, b in itertools.pairwise(skipped))
        ):
            raise _bad(f"skipped {skipped!r} is not increasing layer numbers", ids)
        _check_meta(self.meta, ids)
        object.__setattr__(self, "shape", tuple(shape))
        object.__setattr__(self, "data", view)
        object.__setattr__(self, "route", tuple(self.route))
        object.__setattr__(self, "skipped", tuple(skipped))
        object.__setattr__(self, "meta", dict(self.meta))

    @property
    def n_tokens(self) -> int:
        """Tokens carried (the second to last dimension)."""
        return self.shape[-2]

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor | RawTensor, **fields: Any) -> Self:
        """Wrap a CPU tensor (or its `RawTensor`) without copying it; the other fields are
        keyword arguments."""
        raw = tensor if isinstance(tensor, RawTensor) else RawTensor.of(tensor)
        return cls(dtype=raw.dtype, shape=raw.shape, data=raw.data, **fields)

    def to_tensor(self, *, copy: bool = False) -> torch.Tensor:
        """The tensor; without `copy` it shares the payload's memory and must not be written."""
        t = torch.frombuffer(self.data, dtype=DTYPES[self.dtype]).view(self.shape)
        return t.clone() if copy else t

    def _header(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "kind": self.KIND,
            "mid": self.mid,
            "sid": self.sid,
            "cid": self.cid,
            "model": self.model,
            "step": self.step,
            "pos": [self.pos, self.n_tokens],
            "layer": self.layer,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "route": [h.to_list() for h in self.route],
            "skipped": list(self.skipped),
            "meta": self.meta,
        }


@dataclass(frozen=True, kw_only=True)
class ActivationMessage(TensorMessage):
    """Hidden states travelling to the node that runs `layer` next."""

    KIND: ClassVar[str] = "act"


@dataclass(frozen=True, kw_only=True)
class ResultMessage(TensorMessage):
    """Final hidden states sent back to the client, with the route they took."""

    KIND: ClassVar[str] = "result"


@dataclass(frozen=True, kw_only=True)
class ErrorMessage:
    """A failure reported to the client `cid`; `ref` is the id of the message that failed."""

    KIND: ClassVar[str] = "error"
    code: str  # short machine-readable reason, e.g. `bad_message`, `no_session`
    text: str
    cid: ClientId | None = None
    sid: SessionId | None = None
    ref: MessageId | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    mid: MessageId = field(default_factory=new_message_id)

    def __post_init__(self) -> None:
        ids = _check_ids(self.mid, self.sid, self.cid, required=False)
        if not (self.ref is None or is_message_id(self.ref)):
            raise _bad(f"ref {self.ref!r} is not a message id", ids)
        if not is_name(self.code):
            raise _bad(f"error code {self.code!r} is not a valid name", ids)
        if not (isinstance(self.text, str) and len(self.text) <= MAX_TEXT):
            raise _bad(f"error text is not a string of at most {MAX_TEXT} characters", ids)
        _check_meta(self.meta, ids)
        object.__setattr__(self, "meta", dict(self.meta))

    def _header(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "kind": self.KIND,
            "mid": self.mid,
            "sid": self.sid,
            "cid": self.cid,
            "ref": self.ref,
            "code": self.code,
            "text": self.text,
            "meta": self.meta,
        }


Message = ActivationMessage | ResultMessage | ErrorMessage
_Ids = dict[str, Any]


def encode(msg: Message) -> bytes:
    """The payload for `msg`: prefix, header, tensor bytes."""
    header = msgpack.packb(msg._header(), use_bin_type=True)
    if len(header) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(header)} bytes is over {MAX_HEADER_BYTES}")
    prefix = MAGIC + len(header).to_bytes(4, "big")
    if isinstance(msg, ErrorMessage):
        return prefix + header
    return b"".join((prefix, header, msg.data))


def decode(payload: bytes | bytearray | memoryview, *, max_bytes: int) -> Message:
    """Parse and validate a payload; WireDecodeError (a WireError) says what is wrong."""
    header, body = _split(payload, max_bytes)
    ids = _readable_ids(header)
    version = header.get("v")
    if not (_is_int(version) and version in SUPPORTED_VERSIONS):
        raise _bad(f"wire version {version!r} unsupported (have {sorted(SUPPORTED_VERSIONS)})", ids)
    kind = header.get("kind")
    if not (isinstance(kind, str) and kind in _HEADER_KEYS):
        raise _bad(f"unknown message kind {kind!r}", ids)
    keys, want = set(header), _HEADER_KEYS[kind]
    if keys != want:
        raise _bad(
            f"{kind} header: missing {sorted(want - keys)}, "
            f"unknown {sorted(map(str, keys - want))}",
            ids,
        )
    fields: dict[str, Any] = {k: header[k] for k in keys - {"v", "kind"}}
    if kind == "error":
        if len(body):
            raise _bad(f"error message with {len(body)} trailing bytes", ids)
        return ErrorMessage(**fields)
    pos, shape, route = fields.pop("pos"), fields["shape"], fields.pop("route")
    if not (isinstance(pos, list) and len(pos) == 2 and all(map(_is_int, pos))):
        raise _bad(f"pos {pos!r} is not [start, tokens]", ids)
    if not (isinstance(shape, list) and len(shape) in (2, 3) and pos[1] == shape[-2]):
        raise _bad(f"pos says {pos[1]} tokens but shape is {shape!r}", ids)
    if not isinstance(route, list):
        raise _bad(f"route {route!r} is not a list", ids)
    fields["pos"] = pos[0]
    fields["route"] = tuple(_hop(h, ids) for h in route)
    cls = ActivationMessage if kind == "act" else ResultMessage
    return cls(data=body, **fields)


def bundle(parts: Sequence[bytes | bytearray | memoryview]) -> bytes:
    """One payload carrying `parts` (wire messages, acks) for one topic; a lone part as it is."""
    if len(parts) == 1:
        return bytes(parts[0])
    if not 1 <= len(parts) <= MAX_BUNDLE_PARTS:
        raise WireError(f"a bundle holds 1 to {MAX_BUNDLE_PARTS} parts, not {len(parts)}")
    lengths = [memoryview(p).nbytes for p in parts]
    head = BUNDLE_MAGIC + struct.pack(f">{1 + len(parts)}I", len(parts), *lengths)
    return b"".join((head, *parts))


def unbundle(payload: bytes | bytearray | memoryview) -> list[memoryview]:
    """The parts of a bundle, without copying; `[payload]` when it is not one."""
    view = _byte_view(payload)
    if view is None:
        raise WireDecodeError(f"payload is a {type(payload).__name__}, not contiguous bytes")
    if view[: len(BUNDLE_MAGIC)] != BUNDLE_MAGIC:
        return [view]
    at = len(BUNDLE_MAGIC) + 4
    if view.nbytes < at:
        raise WireDecodeError("bundle too short for its part count")
    (count,) = struct.unpack_from(">I", view, len(BUNDLE_MAGIC))
    if not 1 <= count <= MAX_BUNDLE_PARTS or view.nbytes < at + 4 * count:
        raise WireDecodeError(f"bundle of {count} parts does not fit {view.nbytes} bytes")
    lengths = struct.unpack_from(f">{count}I", view, at)
    at += 4 * count
    if at + sum(lengths) != view.nbytes:
        raise WireDecodeError(
            f"bundle parts add up to {sum(lengths)} bytes, {view.nbytes - at} follow"
        )
    parts = []
    for n in lengths:
        parts.append(view[at : at + n])
        at += n
    return parts


def message_id(payload: bytes | bytearray | memoryview) -> MessageId | None:
    """The `mid` of a wire payload without touching the tensor; None if not a wire payload."""
    try:
        header, _ = _split(payload, len(payload))
    except WireError:
        return None
    mid = header.get("mid")
    return MessageId(mid) if is_message_id(mid) else None


def _split(
    payload: bytes | bytearray | memoryview, max_bytes: int
) -> tuple[dict[Any, Any], memoryview]:
    view = _byte_view(payload)
    if view is None:
        raise WireDecodeError(f"payload is a {type(payload).__name__}, not contiguous bytes")
    size = view.nbytes
    if size < PREFIX_BYTES or view[: len(MAGIC)] != MAGIC:
        raise WireDecodeError("not a wire message (no JV prefix)")
    hlen = int.from_bytes(view[len(MAGIC) : PREFIX_BYTES], "big")
    if hlen > min(size - PREFIX_BYTES, MAX_HEADER_BYTES):
        raise WireDecodeError(f"header length {hlen} does not fit a {size}-byte payload")
    try:
        header = msgpack.unpackb(view[PREFIX_BYTES : PREFIX_BYTES + hlen], raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        # strict_map_key (the default) turns non-string keys into a ValueError here.
        raise WireDecodeError(f"header is not valid msgpack: {e}") from e
    if not isinstance(header, dict):
        raise WireDecodeError(f"header is a {type(header).__name__}, not a map")
    if size > max_bytes:
        # Checked after the (bounded) header so the refusal can still name its sender.
        raise _bad(
            f"payload of {size} bytes is over the limit of {max_bytes}", _readable_ids(header)
        )
    return header, view[PREFIX_BYTES + hlen :]


def _byte_view(data: object) -> memoryview | None:
    """A flat byte view of `data` without copying, or None when it is not contiguous bytes."""
    if not isinstance(data, bytes | bytearray | memoryview):
        return None
    view = memoryview(data)
    if view.format == "B" and view.ndim == 1:
        return view
    return view.cast("B") if view.c_contiguous else None


def _readable_ids(header: Mapping[Any, Any]) -> _Ids:
    # Whatever ids are well-formed let the node address its error reply.
    mid, sid, cid = header.get("mid"), header.get("sid"), header.get("cid")
    return {
        "mid": MessageId(mid) if is_message_id(mid) else None,
        "sid": SessionId(sid) if is_name(sid) else None,
        "cid": ClientId(cid) if is_name(cid) else None,
    }


def _check_ids(mid: Any, sid: Any, cid: Any, *, required: bool) -> _Ids:
    ids = _readable_ids({"mid": mid, "sid": sid, "cid": cid})
    if ids["mid"] is None:
        raise _bad(f"mid {mid!r} is not 32 lowercase hex digits", ids)
    for key, value in (("sid", sid), ("cid", cid)):
        if ids[key] is None and (required or value is not None):
            raise _bad(f"{key} {value!r} is not a valid name", ids)
    return ids


def _hop(item: Any, ids: _Ids) -> RouteHop:
    if not (isinstance(item, list) and len(item) == 5):
        raise _bad(f"route hop {item!r} is not [node, start, end, t_in, t_out]", ids)
    try:
        return RouteHop(*item)
    except WireDecodeError as e:
        raise _bad(str(e), ids) from None


def _check_meta(meta: Any, ids: _Ids) -> None:
    if not (isinstance(meta, Mapping) and _plain(meta, MAX_META_DEPTH)):
        raise _bad("meta is not a map of plain data (str keys, msgpack scalars, lists)", ids)


def _plain(value: Any, depth: int) -> bool:
    if value is None or isinstance(value, bool | float | str | bytes):
        return True
    if isinstance(value, int):
        return -(1 << 63) <= value < (1 << 64)  # what msgpack can carry
    if depth == 0:
        return False
    if type(value) in (list, tuple):  # exact: msgpack's ExtType is a namedtuple
        return all(_plain(v, depth - 1) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v, depth - 1) for k, v in value.items())
    return False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in(value: Any, low: int, high: int) -> bool:
    """`low <= value < high` for a real int (bools excluded)."""
    return _is_int(value) and low <= value < high


def _bad(text: str, ids: _Ids) -> WireDecodeError:
    return WireDecodeError(text, mid=ids["mid"], sid=ids["sid"], cid=ids["cid"])
