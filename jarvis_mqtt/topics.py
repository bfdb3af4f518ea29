"""Every MQTT topic of the mesh, declared once with its payload, and the ids that name things.

Topics start with a root prefix (default `jarvis`; tests use a unique one each) and, where it
matters, the model name, so several models and test runs share one mesh without crosstalk.

| topic                              | payload                                   | retained |
| ---------------------------------- | ----------------------------------------- | -------- |
| `{root}/m/{model}/layer/{layer}`   | `wire.ActivationMessage`                  | no       |
| `{root}/m/{model}/layer/{layer}/{node_id}` | `wire.ActivationMessage` for one node | no    |
| `{root}/m/{model}/free`            | msgpack list of session ids               | no       |
| `{root}/node/{node_id}/status`     | msgpack map, `membership.NodeStatus`      | yes      |
| `{root}/ack/{node_or_client_id}`   | msgpack `Ack` (passed on, or replay from)  | no       |
| `{root}/assign/{node_id}`          | msgpack `Assignment`: spans to host       | yes      |
| `{root}/client/{client_id}/result` | `wire.ResultMessage` or `wire.ErrorMessage` | no     |
| `{root}/file/{node_id}/get`        | msgpack `FileRequest`: a piece of a file   | no       |
| `{root}/file/{name}/data`          | msgpack `FileChunk`: the piece, or why not | no       |

Layer, result and ack payloads may also be a `wire.bundle` of several of them: what a node
sends one receiver for a wave of sessions computed together travels as one MQTT message.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NewType, TypeGuard

import msgpack

from jarvis_mqtt.errors import ConfigError, WireError
from jarvis_mqtt.membership import MeshView, NodeStatus

NodeId = NewType("NodeId", str)
SessionId = NewType("SessionId", str)
ClientId = NewType("ClientId", str)
MessageId = NewType("MessageId", str)  # 32 lowercase hex digits: 16 random bytes

DEFAULT_ROOT = "jarvis"
MAX_NAME = 128  # characters in one topic level we build from a name
MAX_LAYER = 65535  # no model comes near; bounds what the network can ask for
MAX_FREE_IDS = 4096  # session ids in one free message
MAX_FILE_CHUNK = 1 << 20  # bytes of a file in one message
MAX_FILE_NAME = 255

# One topic level: no separators or wildcards, no whitespace or control characters.
_NAME = re.compile(rf"[^/+#\s\x00-\x1f\x7f]{{1,{MAX_NAME}}}")
_MESSAGE_ID = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A file of a model directory: one plain name, nothing that could climb out of it.
_FILE_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{MAX_FILE_NAME - 1}}}")


def is_name(value: object) -> TypeGuard[str]:
    """Whether `value` can be one topic level (a model, node, session or client id)."""
    return isinstance(value, str) and not value.startswith("$") and bool(_NAME.fullmatch(value))


def is_message_id(value: object) -> TypeGuard[str]:
    """Whether `value` looks like a `MessageId`."""
    return isinstance(value, str) and bool(_MESSAGE_ID.fullmatch(value))


def check_name(value: str, what: str) -> str:
    """Return `value` if it is a valid topic level, else ConfigError naming `what`."""
    if not is_name(value):
        raise ConfigError(
            f"bad {what} {value!r}: 1..{MAX_NAME} characters, no '/', '+', '#', whitespace, "
            "control characters or leading '$'"
        )
    return value


def new_message_id() -> MessageId:
    """A fresh random message id (what brokers' duplicates are recognised by)."""
    return MessageId(os.urandom(16).hex())


def new_session_id() -> SessionId:
    """A fresh random session id."""
    return SessionId(os.urandom(8).hex())


def new_client_id(prefix: str = "client") -> ClientId:
    """A fresh client id such as `client-1f2e3d4c`."""
    return ClientId(check_name(f"{prefix}-{os.urandom(4).hex()}", "client id"))


@dataclass(frozen=True)
class TopicSpec:
    """One kind of topic: its pattern, what its payload is, how it is published."""

    pattern: str
    payload: str
    retained: bool = False
    qos: int = 1


# The hot path (activations, results, acks) is QoS 0: each message goes to every broker and
# the sender keeps it until the receiver's own ack (custody), re-sending on a deadline, so a
# per-hop PUBACK would add two packets and a round trip per broker and guarantee nothing more
# (clean sessions drop in-flight QoS 1 messages with their connection anyway).
LAYER = TopicSpec("{root}/m/{model}/layer/{layer}", "wire.ActivationMessage", qos=0)
# Replicas host the same layers but hold different sessions' caches: senders address one node.
NODE_LAYER = TopicSpec("{root}/m/{model}/layer/{layer}/{node_id}", "wire.ActivationMessage", qos=0)
SESSION_FREE = TopicSpec("{root}/m/{model}/free", "msgpack list[SessionId]")
# Statuses are read at QoS 0 and heartbeats sent at QoS 0: each beat is replaced by the next
# (0.5 s later) and silence is judged over three of them, so a PUBACK per status per broker per
# reader would only cost CPU on every process; the first status, the clear and the will are QoS 1.
NODE_STATUS = TopicSpec("{root}/node/{node_id}/status", "msgpack NodeStatus", qos=0, retained=True)
CLIENT_RESULT = TopicSpec(
    "{root}/client/{client_id}/result", "wire.ResultMessage | wire.ErrorMessage", qos=0
)
# A node acknowledges to whoever sent it an activation (the node before it, or the client) once
# it has passed its output on; the sender keeps the message until then (chain of custody).
ACK = TopicSpec("{root}/ack/{name}", "msgpack Ack", qos=0)
# What a planner wants a contributor node to host; retained so a node that restarts finds it.
ASSIGN = TopicSpec("{root}/assign/{node_id}", "msgpack Assignment", retained=True)
# Layer files travel between nodes: a contributor assigned layers it lacks asks a node that has
# them for one piece at a time and gets each piece (or an error) on its own data topic.
FILE_GET = TopicSpec("{root}/file/{node_id}/get", "msgpack FileRequest")
FILE_DATA = TopicSpec("{root}/file/{name}/data", "msgpack FileChunk")
ALL_SPECS = (
    LAYER, NODE_LAYER, ACK, ASSIGN, SESSION_FREE, NODE_STATUS, CLIENT_RESULT, FILE_GET, FILE_DATA
)  # fmt: skip


@dataclass(frozen=True)
class LayerTopic:
    """Parsed `{root}/m/{model}/layer/{layer}[/{node_id}]`."""

    model: str
    layer: int
    node_id: NodeId | None = None  # set when the message is addressed to one node


@dataclass(frozen=True)
class SessionFreeTopic:
    """Parsed `{root}/m/{model}/free`."""

    model: str


@dataclass(frozen=True)
class NodeStatusTopic:
    """Parsed `{root}/node/{node_id}/status`."""

    node_id: NodeId


@dataclass(frozen=True)
class ClientResultTopic:
    """Parsed `{root}/client/{client_id}/result`."""

    client_id: ClientId


@dataclass(frozen=True)
class AckTopic:
    """Parsed `{root}/ack/{name}`."""

    name: str


@dataclass(frozen=True)
class AssignTopic:
    """Parsed `{root}/assign/{node_id}`."""

    node_id: NodeId


@dataclass(frozen=True)
class FileGetTopic:
    """Parsed `{root}/file/{node_id}/get`."""

    node_id: NodeId


@dataclass(frozen=True)
class FileDataTopic:
    """Parsed `{root}/file/{name}/data`."""

    name: str


ParsedTopic = (
    LayerTopic
    | SessionFreeTopic
    | NodeStatusTopic
    | ClientResultTopic
    | AckTopic
    | AssignTopic
    | FileGetTopic
    | FileDataTopic
)


@dataclass(frozen=True)
class Topics:
    """Topic names under one root prefix; builders raise ConfigError on a bad name."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        # A root may have several levels (`test/abc`), each a valid name.
        for level in self.root.split("/"):
            check_name(level, "topic root level")

    def layer(self, model: str, layer: int) -> str:
        """Where activations entering `layer` of `model` go."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= MAX_LAYER:
            raise ConfigError(f"bad layer {layer!r}: an int in 0..{MAX_LAYER}")
        return f"{self.root}/m/{check_name(model, 'model name')}/layer/{layer}"

    def node_layer(self, model: str, layer: int, node_id: NodeId | str) -> str:
        """Where activations entering `layer` of `model` on one particular node go."""
        return f"{self.layer(model, layer)}/{check_name(node_id, 'node id')}"

    def all_layers(self, model: str) -> str:
        """Wildcard over every layer topic of `model`."""
        return f"{self.root}/m/{check_name(model, 'model name')}/layer/+"

    def session_free(self, model: str) -> str:
        """Where clients announce sessions of `model` whose caches nodes may drop."""
        return f"{self.root}/m/{check_name(model, 'model name')}/free"

    def node_status(self, node_id: NodeId | str) -> str:
        """A node's retained status (heartbeat, and its last will saying offline)."""
        return f"{self.root}/node/{check_name(node_id, 'node id')}/status"

    def all_node_status(self) -> str:
        """Wildcard over every node's status."""
        return f"{self.root}/node/+/status"

    def ack(self, name: NodeId | ClientId | str) -> str:
        """Where acknowledgements for activations sent by node or client `name` go."""
        return f"{self.root}/ack/{check_name(name, 'ack receiver')}"

    def assign(self, node_id: NodeId | str) -> str:
        """A contributor node's retained assignment."""
        return f"{self.root}/assign/{check_name(node_id, 'node id')}"

    def all_assign(self) -> str:
        """Wildcard over every node's assignment."""
        return f"{self.root}/assign/+"

    def client_result(self, client_id: ClientId | str) -> str:
        """Where results and errors for one client go."""
        return f"{self.root}/client/{check_name(client_id, 'client id')}/result"

    def file_get(self, node_id: NodeId | str) -> str:
        """Where node `node_id` takes requests for pieces of its model files."""
        return f"{self.root}/file/{check_name(node_id, 'node id')}/get"

    def file_data(self, name: str) -> str:
        """Where the pieces `name` asked for arrive."""
        return f"{self.root}/file/{check_name(name, 'file receiver')}/data"

    def parse(self, topic: str) -> ParsedTopic:
        """Split a topic under this root back into its parts; WireError if it is not ours."""
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            raise WireError(f"topic {topic!r} is not under root {self.root!r}")
        parts = topic[len(prefix) :].split("/")
        match parts:
            case ["m", model, "layer", layer] if is_name(model) and _is_layer(layer):
                return LayerTopic(model, int(layer))
            case ["m", model, "layer", layer, node] if (
                is_name(model) and _is_layer(layer) and is_name(node)
            ):
                return LayerTopic(model, int(layer), NodeId(node))
            case ["m", model, "free"] if is_name(model):
                return SessionFreeTopic(model)
            case ["node", node_id, "status"] if is_name(node_id):
                return NodeStatusTopic(NodeId(node_id))
            case ["client", client_id, "result"] if is_name(client_id):
                return ClientResultTopic(ClientId(client_id))
            case ["ack", name] if is_name(name):
                return AckTopic(name)
            case ["assign", node_id] if is_name(node_id):
                return AssignTopic(NodeId(node_id))
            case ["file", node_id, "get"] if is_name(node_id):
                return FileGetTopic(NodeId(node_id))
            case ["file", name, "data"] if is_name(name):
                return FileDataTopic(name)
        raise WireError(f"unknown topic {topic!r}")


def _is_layer(text: str) -> bool:
    # Canonical decimal only, so a parsed topic builds back to the same string.
    return text.isascii() and text.isdigit() and str(int(text)) == text and int(text) <= MAX_LAYER


def _unpack(payload: bytes | memoryview, what: str) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise WireError(f"{what} is not valid msgpack: {e}") from e


def pack_session_free(session_ids: Iterable[SessionId]) -> bytes:
    """Payload of a session-free message."""
    ids = list(session_ids)
    for sid in ids:
        check_name(sid, "session id")
    return msgpack.packb(ids)


def unpack_session_free(payload: bytes) -> list[SessionId]:
    """Session ids from a session-free payload; WireError when malformed."""
    ids = _unpack(payload, "session-free payload")
    if not isinstance(ids, list) or len(ids) > MAX_FREE_IDS or not all(map(is_name, ids)):
        raise WireError(f"session-free payload is not a list of at most {MAX_FREE_IDS} ids")
    return [SessionId(s) for s in ids]


def pack_status(status: NodeStatus) -> bytes:
    """Payload of a node status message."""
    return msgpack.packb(status.to_dict())


def unpack_status(payload: bytes) -> NodeStatus:
    """A node status from its payload; WireError when malformed."""
    status = NodeStatus.from_dict(_unpack(payload, "node status"))
    if not is_name(status.node_id) or not (is_name(status.model) or status.idle):
        raise WireError(f"node status with a bad node id or model: {status.node_id!r}")
    return status


def fold_status(view: MeshView, topic: NodeStatusTopic, payload: bytes) -> None:
    """Take one status message into `view`: empty is a clean leave; WireError if malformed."""
    if payload:
        view.update(unpack_status(payload))
    else:
        view.forget(topic.node_id)


@dataclass(frozen=True)
class Ack:
    """`by` passed message `mid` on; with `need_from` set it asks for a replay from there."""

    mid: MessageId
    by: NodeId
    need_from: int | None = None  # position the receiver's cache ends at: replay from it


def pack_ack(ack: Ack) -> bytes:
    """Payload of an acknowledgement."""
    return msgpack.packb({"mid": ack.mid, "by": ack.by, "need_from": ack.need_from})


def unpack_ack(payload: bytes | memoryview) -> Ack:
    """An acknowledgement from its payload; WireError when malformed."""
    d = _unpack(payload, "ack")
    if not isinstance(d, dict) or not is_message_id(d.get("mid")) or not is_name(d.get("by")):
        raise WireError("ack is not a map with a message id and a node id")
    need = d.get("need_from")
    if need is not None and not (isinstance(need, int) and 0 <= need <= 1 << 31):
        raise WireError(f"ack need_from {need!r} is not a position")
    return Ack(MessageId(d["mid"]), NodeId(d["by"]), need)


def is_sha256(value: object) -> TypeGuard[str]:
    """Whether `value` is a hex sha256 digest (lowercase)."""
    return isinstance(value, str) and bool(_SHA256.fullmatch(value))


def is_file_name(value: object) -> TypeGuard[str]:
    """Whether `value` can name a file of a model directory (no path, no leading dot)."""
    return isinstance(value, str) and bool(_FILE_NAME.fullmatch(value))


@dataclass(frozen=True)
class Assignment:
    """Spans a node should host, one per model; an empty tuple means host nothing.

    `manifests` gives, per model, the sha256 of the planner's `manifest.json`: a node that
    lacks the model's files fetches them from nodes that have them and trusts a fetched
    manifest only if it has that hash (and each file only if it matches the manifest).
    """

    spans: tuple[tuple[str, int, int], ...]  # (model, start, end), half-open
    plan: str = ""  # id of the plan this came from
    manifests: tuple[tuple[str, str], ...] = ()  # (model, sha256 of its manifest.json), sorted

    def manifest(self, model: str) -> str | None:
        """The manifest hash given for `model`, if any."""
        return dict(self.manifests).get(model)


def pack_assignment(a: Assignment) -> bytes:
    """Payload of an assignment."""
    spans = [{"model": m, "start": s, "end": e} for m, s, e in a.spans]
    return msgpack.packb({"plan": a.plan, "spans": spans, "manifests": dict(a.manifests)})


def unpack_assignment(payload: bytes) -> Assignment:
    """An assignment from its payload; WireError when malformed."""
    d = _unpack(payload, "assignment")
    try:
        spans = tuple((str(x["model"]), int(x["start"]), int(x["end"])) for x in d["spans"])
        plan = str(d.get("plan", ""))
        manifests = tuple(sorted(dict(d.get("manifests") or {}).items()))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise WireError(f"bad assignment: {e!r}") from e
    for model, start, end in spans:
        if not is_name(model) or not 0 <= start < end <= MAX_LAYER:
            raise WireError(f"bad assignment span {model!r} [{start}, {end})")
    if len({m for m, _, _ in spans}) != len(spans):
        raise WireError("an assignment has one span per model at most")
    for model, digest in manifests:
        if not is_name(model) or not is_sha256(digest):
            raise WireError(f"bad manifest hash for {model!r} in an assignment")
    return Assignment(spans, plan, manifests)


@dataclass(frozen=True)
class FileRequest:
    """Asks a node for `length` bytes at `offset` of one file of its model directory."""

    rid: MessageId  # answered in the chunk, so the asker matches answers to requests
    model: str
    file: str  # a name listed in the manifest, or `manifest.json`
    offset: int
    length: int
    reply: str  # the asker's name: the chunk goes to `file_data(reply)`


@dataclass(frozen=True)
class FileChunk:
    """A piece of a file (`size` is the whole file's), or `error` saying why there is none."""

    rid: MessageId
    offset: int = 0
    size: int = 0
    data: bytes = b""
    error: str = ""


def pack_file_request(r: FileRequest) -> bytes:
    """Payload of a file request."""
    return msgpack.packb(dataclasses.asdict(r))


def unpack_file_request(payload: bytes) -> FileRequest:
    """A file request from its payload; WireError when malformed."""
    d = _unpack(payload, "file request")
    if not isinstance(d, dict):
        raise WireError("file request is not a map")
    rid, model, name, reply = d.get("rid"), d.get("model"), d.get("file"), d.get("reply")
    offset, length = d.get("offset"), d.get("length")
    if not (is_message_id(rid) and is_name(model) and is_name(reply) and is_file_name(name)):
        raise WireError("file request needs a message id, a model, a plain file name and a reply")
    if not (_is_count(offset, 1 << 40) and _is_count(length, MAX_FILE_CHUNK) and length > 0):
        raise WireError(f"file request range {offset!r}+{length!r} out of bounds")
    return FileRequest(MessageId(rid), model, name, offset, length, reply)


def pack_file_chunk(c: FileChunk) -> bytes:
    """Payload of a file chunk."""
    return msgpack.packb(dataclasses.asdict(c), use_bin_type=True)


def unpack_file_chunk(payload: bytes) -> FileChunk:
    """A file chunk from its payload; WireError when malformed."""
    d = _unpack(payload, "file chunk")
    if not isinstance(d, dict) or not is_message_id(d.get("rid")):
        raise WireError("file chunk is not a map with a message id")
    offset, size, data, error = d.get("offset"), d.get("size"), d.get("data"), d.get("error")
    if not (_is_count(offset, 1 << 40) and _is_count(size, 1 << 40)):
        raise WireError("file chunk offset or size out of bounds")
    if not isinstance(data, bytes) or len(data) > MAX_FILE_CHUNK or not isinstance(error, str):
        raise WireError("file chunk data is not bytes of at most one chunk, or error not text")
    return FileChunk(MessageId(d["rid"]), offset, size, data, error[:500])


def _is_count(value: object, limit: int) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit
