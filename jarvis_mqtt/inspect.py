"""`jarvis inspect`: look at the mesh's MQTT traffic, for debugging.

    jarvis inspect nodes [--json] [--watch]        the live mesh, from the retained statuses
    jarvis inspect tail [FILTER] [--model M] [--session S] [--node N] [--json] [--count N]
    jarvis inspect trace SESSION [--json] [--count N]   each step's route, hop by hop

Each connects to every broker (`--broker`, default: the local mesh of `jarvis mesh up`) as a
plain subscriber and never publishes. The decoding, tables and traces are pure functions in
`inspect_decode`, `inspect_nodes` and `inspect_trace`; this module only moves messages to them.
Heavy imports (torch, through the wire format) wait until a command runs, so that building the
`jarvis` parser stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect as pyinspect
import json
import logging
import os
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jarvis_mqtt import topics as T
from jarvis_mqtt.brokers import BrokerAddress, parse_brokers
from jarvis_mqtt.errors import ConfigError, JarvisError, MeshError

if TYPE_CHECKING:
    from jarvis_mqtt.inspect_decode import Record
    from jarvis_mqtt.inspect_nodes import NodeBoard
    from jarvis_mqtt.inspect_trace import StepRoute, TraceBuilder
    from jarvis_mqtt.transport import MeshClient, MeshMessage

FALLBACK_BROKER = BrokerAddress("127.0.0.1")  # when neither --broker nor a local mesh is there
SETTLE = 0.5  # seconds without a new retained status before `nodes` has them all
SETTLE_LIMIT = 5.0  # seconds `nodes` collects at most
CONNECT_TIMEOUT = 5.0  # seconds for the first broker to answer
REFRESH = 0.5  # seconds between redraws of `nodes --watch`
AUTH_FIELDS = ("username", "password", "tls_ca", "tls_cert", "tls_key", "tls_insecure")


@dataclass(frozen=True, kw_only=True)
class Connection:
    """Where to inspect: every broker, the topic root, and how to log in (None: not given).

    What is not given is left to MeshClient, which falls back to `$JARVIS_MQTT_*`.
    """

    brokers: tuple[BrokerAddress, ...]
    root: str = T.DEFAULT_ROOT
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None  # path of the mesh CA (PEM); TLS on when given
    tls_cert: str | None = None  # client certificate (PEM), when brokers require one
    tls_key: str | None = None  # its private key
    tls_insecure: bool | None = None  # True: skip the broker host name check

    @property
    def topics(self) -> T.Topics:
        """Topic names under this root."""
        return T.Topics(self.root)


def connection_from_args(a: argparse.Namespace) -> Connection:
    """Brokers and root from the flags, else from the local mesh state, else localhost:1883."""
    from jarvis_mqtt.mesh import LocalMesh

    if a.broker:
        brokers, root = parse_brokers(a.broker), a.topic_root or T.DEFAULT_ROOT
    else:
        try:
            mesh = LocalMesh.load()
        except (MeshError, OSError, ValueError, KeyError, TypeError):  # absent or unreadable state
            brokers, root = [FALLBACK_BROKER], a.topic_root or T.DEFAULT_ROOT
        else:
            brokers, root = mesh.addresses, a.topic_root or mesh.topic_root
    conn = Connection(
        brokers=tuple(brokers),
        root=root,
        username=a.username,
        password=a.password,
        tls_ca=a.tls_ca,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        tls_insecure=a.tls_insecure or None,
    )
    conn.topics  # noqa: B018 - a bad root fails here, as a ConfigError, not deep in a task
    return conn


def mesh_client(conn: Connection, **kw: Any) -> MeshClient:
    """A MeshClient on every broker; credentials and TLS passed only when given."""
    from jarvis_mqtt.transport import MeshClient

    auth = {k: getattr(conn, k) for k in AUTH_FIELDS if getattr(conn, k) is not None}
    # MeshClient gains these keywords in a concurrent change: ask it rather than assume.
    accepted = pyinspect.signature(MeshClient).parameters
    unsupported = [k for k in auth if k not in accepted]
    if unsupported:
        flags = ", ".join("--" + k.replace("_", "-") for k in unsupported)
        raise ConfigError(f"{flags}: this version of MeshClient does not support them")
    kw.setdefault("connect_timeout", CONNECT_TIMEOUT)
    return MeshClient(list(conn.brokers), client_id=str(T.new_client_id("inspect")), **auth, **kw)


async def _next(it: AsyncIterator[MeshMessage], timeout: float) -> MeshMessage | None:
    """The next message, or None after `timeout` seconds; StopAsyncIteration at the end."""
    try:
        return await asyncio.wait_for(anext(it), max(timeout, 0.0))
    except TimeoutError:
        return None


# -- nodes ---------------------------------------------------------------------------------------


def _fold_status(board: NodeBoard, topics: T.Topics, m: MeshMessage) -> bool:
    try:
        parsed = topics.parse(m.topic)
    except JarvisError:
        return False
    if not isinstance(parsed, T.NodeStatusTopic):
        return False
    board.add(parsed.node_id, m.payload)
    return True


async def collect_nodes(
    conn: Connection, *, settle: float = SETTLE, limit: float = SETTLE_LIMIT
) -> NodeBoard:
    """The retained statuses: until `settle` s pass without a new one, `limit` s at most."""
    from jarvis_mqtt.inspect_nodes import NodeBoard

    board = NodeBoard()
    loop = asyncio.get_running_loop()
    async with mesh_client(conn) as mesh:
        await mesh.subscribe(conn.topics.all_node_status(), qos=T.NODE_STATUS.qos)
        it = aiter(mesh.messages())
        now = loop.time()
        quiet_until, deadline = now + settle, now + limit
        # Heartbeats (not retained) keep coming: only retained ones extend the wait.
        while (now := loop.time()) < min(quiet_until, deadline):
            m = await _next(it, min(quiet_until, deadline) - now)
            if m is not None and _fold_status(board, conn.topics, m) and m.retain:
                quiet_until = loop.time() + settle
    return board


async def watch_nodes(
    conn: Connection, show: Callable[[NodeBoard], None], *, every: float = REFRESH
) -> None:
    """Call `show(board)` every `every` seconds while statuses come in, until cancelled."""
    from jarvis_mqtt.inspect_nodes import NodeBoard

    board = NodeBoard()
    loop = asyncio.get_running_loop()
    async with mesh_client(conn) as mesh:
        await mesh.subscribe(conn.topics.all_node_status(), qos=T.NODE_STATUS.qos)
        it = aiter(mesh.messages())
        next_show = loop.time() + every
        while True:
            m = await _next(it, next_show - loop.time())
            if m is not None:
                _fold_status(board, conn.topics, m)
            if loop.time() >= next_show:
                show(board)
                next_show = loop.time() + every


async def _cmd_nodes(a: argparse.Namespace, conn: Connection) -> None:
    from rich.console import Console
    from rich.live import Live

    from jarvis_mqtt.inspect_nodes import node_rows, nodes_table

    title = f"nodes under {conn.root!r} on {', '.join(map(str, conn.brokers))}"
    if not a.watch:
        rows = node_rows(await collect_nodes(conn), time.time())
        if a.json:
            _out(json.dumps(rows))
        else:
            Console().print(nodes_table(rows, title))
        return
    if a.json:
        last: list[Any] = []

        def emit(board: NodeBoard) -> None:
            rows = node_rows(board, time.time())
            # Ages and heartbeat times change every second: print when anything else did.
            key = [{k: v for k, v in r.items() if k not in ("age", "heartbeat")} for r in rows]
            if key != last:
                last[:] = key
                _out(json.dumps(rows))

        await watch_nodes(conn, emit, every=1.0)
        return
    with Live(nodes_table([], title), refresh_per_second=4) as live:
        await watch_nodes(
            conn, lambda b: live.update(nodes_table(node_rows(b, time.time()), title))
        )


# -- tail ----------------------------------------------------------------------------------------


async def tail_records(
    conn: Connection,
    topic_filter: str | None = None,
    *,
    on_ready: Callable[[], None] | None = None,
) -> AsyncGenerator[Record, None]:
    """Every message under `topic_filter` (default `{root}/#`) as a record, until closed."""
    from jarvis_mqtt.inspect_decode import describe

    async with mesh_client(conn) as mesh:
        await mesh.subscribe(topic_filter or f"{conn.root}/#")
        if on_ready is not None:
            on_ready()
        async for m in mesh.messages():
            yield describe(
                m.topic,
                m.payload,
                root=conn.root,
                retained=m.retain,
                received=time.time(),
                broker=str(m.broker),
            )


async def _cmd_tail(a: argparse.Namespace, conn: Connection) -> None:
    from jarvis_mqtt.inspect_decode import format_record, matches

    topic_filter = a.filter or f"{conn.root}/#"
    shown = 0
    ready = _ready_note(f"tail {topic_filter}", conn)
    async with contextlib.aclosing(tail_records(conn, topic_filter, on_ready=ready)) as records:
        async for rec in records:
            if not matches(rec, model=a.model, session=a.session, node=a.node):
                continue
            _out(json.dumps(rec) if a.json else format_record(rec))
            shown += 1
            if a.count and shown >= a.count:
                return


# -- trace ---------------------------------------------------------------------------------------


async def trace_steps(
    conn: Connection, builder: TraceBuilder, *, on_ready: Callable[[], None] | None = None
) -> AsyncGenerator[StepRoute, None]:
    """Feed the session's activations, results and errors to `builder`; yield finished steps."""
    from jarvis_mqtt import wire
    from jarvis_mqtt.errors import WireError

    needle = builder.session.encode()
    ack_prefix = f"{conn.root}/ack/"
    async with mesh_client(conn) as mesh:
        await mesh.subscribe(f"{conn.root}/m/+/layer/#")
        await mesh.subscribe(f"{conn.root}/client/+/result")
        await mesh.subscribe(f"{conn.root}/ack/+")
        if on_ready is not None:
            on_ready()
        async for m in mesh.messages():
            if not m.topic.startswith(ack_prefix) and needle not in m.payload:
                continue  # cheap: the session id is in the header of all its messages
            try:
                parts = wire.unbundle(m.payload)  # a wave of sessions travels as one bundle
                parsed = conn.topics.parse(m.topic)
            except WireError:
                continue
            to = parsed.node_id if isinstance(parsed, T.LayerTopic) else None
            for part in parts:
                if isinstance(parsed, T.AckTopic):
                    _fold_ack(builder, part)  # acks name no session: placed by message id
                    continue
                if needle not in bytes(part):
                    continue
                try:
                    msg = wire.decode(part, max_bytes=len(part))
                except WireError:
                    continue
                for st in builder.add(msg, to=to, received=time.time()):
                    yield st


def _fold_ack(builder: TraceBuilder, payload: bytes | memoryview) -> None:
    from jarvis_mqtt.errors import WireError
    from jarvis_mqtt.inspect_decode import ack_fields

    try:
        ack = ack_fields(payload)
    except WireError:
        return
    builder.ack(ack["mid"], ack["by"], ack["need_from"])


async def _cmd_trace(a: argparse.Namespace, conn: Connection) -> None:
    from jarvis_mqtt.inspect_trace import TraceBuilder, format_step

    builder = TraceBuilder(a.session)
    finished: set[int | None] = set()

    def show(st: StepRoute) -> None:
        d = st.to_dict()
        _out(json.dumps(d) if a.json else format_step(d))

    ready = _ready_note(f"trace session {a.session}", conn)
    try:
        async with contextlib.aclosing(trace_steps(conn, builder, on_ready=ready)) as steps:
            async for st in steps:
                show(st)
                finished.add(st.step)
                if a.count and len(finished) >= a.count:
                    return
    finally:
        # Ctrl-C or the mesh going away: show where the unfinished steps got stuck.
        if not (a.count and len(finished) >= a.count):
            for st in builder.unfinished():
                show(st)


# -- command line --------------------------------------------------------------------------------


def _out(line: str) -> None:
    print(line, flush=True)


def _ready_note(what: str, conn: Connection) -> Callable[[], None]:
    """A callback saying on stderr that the subscription is in place (scripts wait for it)."""

    def note() -> None:
        brokers = ", ".join(map(str, conn.brokers))
        print(f"# {what} on {brokers}", file=sys.stderr, flush=True)

    return note


COMMANDS = {"nodes": _cmd_nodes, "tail": _cmd_tail, "trace": _cmd_trace}


def run(a: argparse.Namespace) -> int:
    """Run the parsed `inspect` command; Ctrl-C is its normal end (exit code 0)."""
    conn = connection_from_args(a)
    try:
        asyncio.run(COMMANDS[a.inspect_cmd](a, conn))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep the exit flush from failing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


def _connection_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--broker", help="HOST:PORT[,...]; default: the local mesh (`jarvis mesh up`)")
    g.add_argument("--topic-root", default=None, help="default: the local mesh's, else jarvis")
    # Credentials left out are MeshClient's to find ($JARVIS_MQTT_USERNAME, ...): not in `ps`.
    g.add_argument("--username", default=None, help="default: $JARVIS_MQTT_USERNAME")
    g.add_argument("--password", default=None, help="default: $JARVIS_MQTT_PASSWORD")
    g.add_argument("--tls-ca", default=None, metavar="PEM", help="mesh CA; enables TLS")
    g.add_argument("--tls-cert", default=None, metavar="PEM", help="client certificate")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="client certificate key")
    g.add_argument("--tls-insecure", action="store_true", help="skip the host name check")
    return p


def _count(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return n


def add_nodes_flags(p: argparse.ArgumentParser) -> None:
    """Flags of `jarvis inspect nodes` (and of its alias `jarvis nodes`)."""
    p.add_argument("--json", action="store_true", help="print once as JSON (with --watch: lines)")
    p.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    p.set_defaults(func=run, inspect_cmd="nodes")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `nodes`, `tail` and `trace` subcommands."""
    conn = [_connection_flags()]
    add_nodes_flags(sub.add_parser("nodes", parents=conn, help="the live mesh: nodes and load"))

    t = sub.add_parser("tail", parents=conn, help="every message, decoded")
    t.add_argument("filter", nargs="?", metavar="TOPIC_FILTER", help="default: {root}/#")
    t.add_argument("--model", help="only messages of this model")
    t.add_argument("--session", help="only messages of this session")
    t.add_argument("--node", help="only messages to, from or through this node")
    t.add_argument("--json", action="store_true", help="one JSON object per line")
    t.add_argument("--count", type=_count, default=0, help="stop after N messages (0: never)")
    t.set_defaults(func=run, inspect_cmd="tail")

    r = sub.add_parser("trace", parents=conn, help="the route of each step of a session")
    r.add_argument("session")
    r.add_argument("--json", action="store_true", help="one JSON object per step")
    r.add_argument("--count", type=_count, default=0, help="stop after N steps (0: never)")
    r.set_defaults(func=run, inspect_cmd="trace")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `inspect` (and `nodes`, an alias of `inspect nodes`) to the `jarvis` subcommands."""
    p = sub.add_parser("inspect", help="decode the mesh's MQTT traffic (nodes, tail, trace)")
    add_commands(p.add_subparsers(dest="inspect_cmd", required=True))
    add_nodes_flags(
        sub.add_parser(
            "nodes",
            parents=[_connection_flags()],
            help="the live mesh (same as `jarvis inspect nodes`)",
        )
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m jarvis_mqtt.inspect`, the same as `jarvis inspect`."""
    p = argparse.ArgumentParser(prog="jarvis inspect", description=(__doc__ or "").split("\n\n")[0])
    add_commands(p.add_subparsers(dest="inspect_cmd", required=True))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m jarvis_mqtt.inspect`."""
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    try:
        return run(a)
    except JarvisError as e:
        print(f"jarvis inspect: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
