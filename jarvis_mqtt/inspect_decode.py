"""What a mesh message says, as a flat dict of readable fields, and one line of text for it.

Pure functions for `jarvis inspect tail`: `describe` turns any (topic, payload) into a record
that is safe to print as JSON (bytes as hex, no NaN) and never raises on garbage;
`matches` filters records; `format_record` renders one like `mosquitto_sub -v`, but readable.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from typing import Any

import msgpack
import torch

from jarvis_mqtt import topics as T
from jarvis_mqtt import wire
from jarvis_mqtt.errors import WireError
from jarvis_mqtt.membership import NodeStatus, format_layers

HEX_HEAD = 32  # bytes of an undecodable payload shown in hex
MAX_VALUE_CHARS = 200  # characters of a free-form value shown on one line
Record = dict[str, Any]


def describe(
    topic: str,
    payload: bytes,
    *,
    root: str,
    retained: bool = False,
    received: float | None = None,  # wall clock, seconds since the epoch
    broker: str | None = None,
) -> Record:
    """Every field worth showing of one message; `kind` says which fields there are."""
    rec: Record = {"topic": topic, "kind": "", "bytes": len(payload)}
    if received is not None:
        rec["time"] = received
    if retained:
        rec["retained"] = True
    if broker is not None:
        rec["broker"] = broker
    place = topic_fields(topic, root)
    rec.update(place)
    try:
        rec.update(_payload_fields(place.get("topic_kind", "other"), payload, received))
    except WireError as e:
        rec.update(_undecodable(payload, str(e)))
    return rec


def topic_fields(topic: str, root: str) -> Record:
    """What the topic itself names: its kind, model, layer, the node or client addressed."""
    prefix = root + "/"
    rest = topic[len(prefix) :].split("/") if topic.startswith(prefix) else None
    match rest:
        case ["m", model, "layer", layer]:
            return {"topic_kind": "layer", "model": model, "layer": _int_or_text(layer)}
        case ["m", model, "layer", layer, node]:
            return {
                "topic_kind": "layer",
                "model": model,
                "layer": _int_or_text(layer),
                "to": node,
            }
        case ["m", model, "free"]:
            return {"topic_kind": "free", "model": model}
        case ["node", node, "status"]:
            return {"topic_kind": "status", "node": node}
        case ["client", client, "result"]:
            return {"topic_kind": "result", "client": client}
        case ["ack", name]:
            return {"topic_kind": "ack", "to": name}
    return {"topic_kind": "other"}


def _payload_fields(where: str, payload: bytes, received: float | None) -> Record:
    if payload[: len(wire.BUNDLE_MAGIC)] == wire.BUNDLE_MAGIC:  # a wave's messages in one
        parts = []
        for part in wire.unbundle(payload):
            try:
                parts.append(_payload_fields(where, bytes(part), received))
            except WireError as e:
                parts.append(_undecodable(bytes(part), str(e)))
        return {"kind": "bundle", "parts": parts}
    # Wire messages are recognised by their prefix wherever they show up.
    if payload[: len(wire.MAGIC)] == wire.MAGIC:
        return wire_fields(payload)
    if where == "status":
        if not payload:
            return {"kind": "status-cleared"}
        return status_fields(T.unpack_status(payload), received)
    if where == "free":
        return {"kind": "free", "sessions": list(T.unpack_session_free(payload))}
    if where == "ack":
        return ack_fields(payload)
    if where in ("layer", "result"):
        raise WireError("not a wire message (no JV prefix)")
    return _other_fields(payload)


def wire_fields(payload: bytes) -> Record:
    """Fields of a wire payload (activation, result or error); WireError when it does not decode."""
    hlen = int.from_bytes(payload[len(wire.MAGIC) : wire.PREFIX_BYTES], "big")
    try:
        msg = wire.decode(payload, max_bytes=len(payload))
    except WireError as e:
        rec = _undecodable(payload, str(e))
        header = _raw_header(payload, hlen)
        if header is not None:
            rec["header"] = header
            for key in ("mid", "sid", "cid", "model", "step", "layer"):
                if key in header:
                    rec.setdefault(key, header[key])
        return rec
    rec = {"kind": msg.KIND, "mid": msg.mid, "sid": msg.sid, "cid": msg.cid}
    rec["header_bytes"] = wire.PREFIX_BYTES + hlen
    if isinstance(msg, wire.ErrorMessage):
        rec.update(ref=msg.ref, code=msg.code, text=msg.text, meta=jsonable(msg.meta))
        return rec
    rec.update(
        model=msg.model,
        step=msg.step,
        pos=msg.pos,
        tokens=msg.n_tokens,
        layer=msg.layer,
        dtype=msg.dtype,
        shape=list(msg.shape),
        stats=tensor_stats(msg.to_tensor()),
        route=[hop_fields(h) for h in msg.route],
        skipped=list(msg.skipped),
        meta=jsonable(msg.meta),
        tensor_bytes=memoryview(msg.data).nbytes,
    )
    return rec


def hop_fields(hop: wire.RouteHop) -> Record:
    """One route hop with its compute time in milliseconds."""
    return {
        "node": hop.node,
        "start": hop.start,
        "end": hop.end,
        "t_in": hop.t_in,
        "t_out": hop.t_out,
        "ms": round((hop.t_out - hop.t_in) * 1e3, 3),
    }


def tensor_stats(t: torch.Tensor) -> Record:
    """min, max, mean, std (population) and L2 norm of the finite values; how many are not."""
    x = t.detach().reshape(-1).to(torch.float64)
    finite = torch.isfinite(x)
    nonfinite = int(x.numel() - int(finite.sum()))
    x = x[finite]
    if x.numel() == 0:
        return {
            "min": None,
            "max": None,
            "mean": None,
            "std": None,
            "norm": None,
            "nonfinite": nonfinite,
        }
    return {
        "min": float(x.min()),
        "max": float(x.max()),
        "mean": float(x.mean()),
        "std": float(x.std(correction=0)),
        "norm": float(torch.linalg.vector_norm(x)),
        "nonfinite": nonfinite,
    }


def status_fields(st: NodeStatus, received: float | None = None) -> Record:
    """A node status; `age` is the receive time less the sender's clock, when known."""
    rec: Record = {
        "kind": "status",
        "node": st.node_id,
        "model": st.model,
        "start": st.start,
        "end": st.end,
        "online": st.online,
        "status_time": st.time,
        "host": st.host,
        "pid": st.pid,
        "capacity": jsonable(st.capacity),
        "load": jsonable(st.load),
    }
    if received is not None and st.time > 0:
        rec["age"] = round(received - st.time, 3)
    return rec


def ack_fields(payload: bytes | memoryview) -> Record:
    """Fields of an acknowledgement (`topics.Ack`); WireError when it is not one."""
    d = _unpack(payload, "ack")
    if not (isinstance(d, dict) and T.is_message_id(d.get("mid")) and T.is_name(d.get("by"))):
        raise WireError("ack is not a map with a message id and a node id")
    need = d.get("need_from")
    if need is not None and not (type(need) is int and need >= 0):
        raise WireError(f"ack need_from {need!r} is not a position")
    return {"kind": "ack", "mid": d["mid"], "by": d["by"], "need_from": need}


def _other_fields(payload: bytes) -> Record:
    """A payload on a topic that is not ours: msgpack, text, or bytes."""
    if not payload:
        return {"kind": "empty"}
    try:
        return {"kind": "msgpack", "value": jsonable(_unpack(payload, "payload"))}
    except WireError:
        pass
    try:
        return {"kind": "text", "value": payload.decode("utf-8")}
    except UnicodeDecodeError:
        return _undecodable(payload, "not msgpack, text or a wire message")


def _unpack(payload: bytes | memoryview, what: str) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise WireError(f"{what} is not valid msgpack: {e}") from e


def _raw_header(payload: bytes, hlen: int) -> Record | None:
    """The header map of a wire payload that failed validation, if it is msgpack at all."""
    try:
        header = _unpack(payload[wire.PREFIX_BYTES : wire.PREFIX_BYTES + hlen], "header")
    except WireError:
        return None
    return jsonable(header) if isinstance(header, dict) else None


def _undecodable(payload: bytes, why: str) -> Record:
    return {"kind": "undecodable", "error": why, "hex": payload[:HEX_HEAD].hex()}


def _int_or_text(text: str) -> int | str:
    return int(text) if text.isascii() and text.isdigit() else text


def jsonable(value: Any, depth: int = 16) -> Any:
    """`value` with bytes as hex, non-finite floats as text and odd keys as strings."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if depth == 0:
        return repr(value)[:MAX_VALUE_CHARS]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, depth - 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, depth - 1) for v in value]
    return repr(value)[:MAX_VALUE_CHARS]


def matches(
    rec: Record, *, model: str | None = None, session: str | None = None, node: str | None = None
) -> bool:
    """Whether a record concerns `model`, `session` and `node` (each only when given); a
    bundle does when one of its messages does."""
    if rec.get("kind") == "bundle":
        base = {k: v for k, v in rec.items() if k != "parts"}
        return any(
            matches({**base, **part}, model=model, session=session, node=node)
            for part in rec["parts"]
        )
    if model is not None and rec.get("model") != model:
        return False
    if session is not None and session != rec.get("sid") and session not in rec.get("sessions", ()):
        return False
    if node is None:
        return True
    meta = rec.get("meta")
    nodes = {rec.get(k) for k in ("to", "node", "by")}
    nodes.update(h.get("node") for h in rec.get("route", ()))
    if isinstance(meta, dict):
        nodes.add(meta.get("node"))
    return node in nodes


def format_record(rec: Record) -> str:
    """One line: receive time, topic, kind, then the fields that matter for that kind."""
    head = []
    if "time" in rec:
        clock = datetime.datetime.fromtimestamp(rec["time"]).strftime("%H:%M:%S.%f")[:-3]
        head.append(clock)
    head += [rec["topic"], rec["kind"] + (" (retained)" if rec.get("retained") else "")]
    return "  ".join([*head, _details(rec)]).rstrip()


def _details(rec: Record) -> str:
    kind = rec["kind"]
    if kind == "bundle":
        return " | ".join(f"{p['kind']}: {_details(p)}" for p in rec["parts"])
    if kind in ("act", "result"):
        return _tensor_details(rec)
    if kind == "error":
        ids = _kv(rec, "sid", "cid", "ref")
        return f"{ids} {rec['code']}: {rec['text']}{_meta(rec)} mid={_short(rec['mid'])}"
    if kind == "status":
        return _status_details(rec)
    if kind == "status-cleared":
        return "retained status cleared"
    if kind == "free":
        return "sessions=" + ",".join(rec["sessions"])
    if kind == "ack":
        need = "" if rec["need_from"] is None else f" need_from={rec['need_from']}"
        return f"mid={_short(rec['mid'])} by={rec['by']}{need}"
    if kind in ("msgpack", "text"):
        return _clip(repr(rec["value"]))
    if kind == "empty":
        return "(empty payload)"
    partial = _kv(rec, "sid", "cid", "step", "layer")
    return f"{rec['bytes']} B: {rec['error']}{' ' + partial if partial else ''} hex={rec['hex']}"


def _tensor_details(rec: Record) -> str:
    s = rec["stats"]
    shape = ",".join(map(str, rec["shape"]))
    parts = [
        f"sid={rec['sid']} step={rec['step']} pos={rec['pos']}+{rec['tokens']} "
        f"layer={rec['layer']} {rec['dtype']}[{shape}]",
        " ".join(f"{k}={_num(s[k])}" for k in ("min", "max", "mean", "std", "norm")),
    ]
    if s["nonfinite"]:
        parts.append(f"NONFINITE={s['nonfinite']}")
    route = " > ".join(
        f"{h['node']}[{h['start']},{h['end']}) {h['ms']:.1f}ms" for h in rec["route"]
    )
    parts.append(f"route={route or '-'}")
    if rec["skipped"]:
        parts.append(f"skipped={format_layers(rec['skipped']).replace(' ', '')}")
    parts.append(f"hdr={rec['header_bytes']}B tensor={rec['tensor_bytes']}B")
    parts.append(f"cid={rec['cid']} mid={_short(rec['mid'])}{_meta(rec)}")
    return "  ".join(parts)


def _status_details(rec: Record) -> str:
    state = "online" if rec["online"] else "OFFLINE"
    load = rec["load"]
    loads = " ".join(f"{k}={_size(v) if k.endswith('bytes') else v}" for k, v in load.items())
    age = f" age={rec['age']:.1f}s" if "age" in rec else ""
    return (
        f"{rec['node']} {rec['model']} [{rec['start']},{rec['end']}) {state} "
        f"host={rec['host']} pid={rec['pid']} {loads}{age}"
    ).replace("  ", " ")


def _kv(rec: Record, *keys: str) -> str:
    return " ".join(f"{k}={rec[k]}" for k in keys if rec.get(k) is not None)


def _meta(rec: Record) -> str:
    meta = rec.get("meta")
    return f" meta={_clip(repr(meta))}" if meta else ""


def _short(mid: Any) -> str:
    return str(mid)[:8]


def _clip(text: str) -> str:
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _size(n: Any) -> str:
    """Bytes as B, KiB, MiB or GiB."""
    if not isinstance(n, int | float):
        return str(n)
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GiB"
