"""A whole mesh on one machine: brokers and node agents as processes, for demos and tests.

`LocalMesh` starts N Mosquitto brokers on free loopback ports and M node agents splitting a
model's layers evenly, waits until every node announces itself, and stops every process by its
pid. `jarvis mesh up/down/status` drive it through a state file so the mesh outlives the CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from jarvis_mqtt.brokers import BrokerAddress, MosquittoBroker
from jarvis_mqtt.errors import MeshError


def even_spans(num_layers: int, nodes: int) -> list[tuple[int, int]]:
    """Split `[0, num_layers)` into `nodes` contiguous half-open spans, sizes differing by <= 1."""
    if not 0 < nodes <= num_layers:
        raise MeshError(f"cannot split {num_layers} layers over {nodes} nodes")
    base, extra = divmod(num_layers, nodes)
    spans, start = [], 0
    for i in range(nodes):
        end = start + base + (1 if i < extra else 0)
        spans.append((start, end))
        start = end
    return spans


def default_run_dir() -> Path:
    """Where `jarvis mesh` keeps its state file and logs."""
    return Path(os.environ.get("JARVIS_RUN", Path.home() / ".cache" / "jarvis" / "mesh"))


@dataclass
class NodeProc:
    """A node agent process of the local mesh."""

    node_id: str
    start: int
    end: int
    pid: int
    log: str
    args: list[str] = field(default_factory=list)


@dataclass
class BrokerProc:
    """A broker process of the local mesh."""

    host: str
    port: int
    pid: int
    run_dir: str


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0): reap it if it is ours, else ask /proc (init reaps it later).
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # not Linux, or gone just now: kill(0) said it exists
    return stat.rpartition(")")[2].split()[0] != "Z"


def stop_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM a process, SIGKILL it after `timeout`, and reap it when it is our child."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.01)


class LocalMesh:
    """Brokers and node agents on this machine; a context manager that always cleans up."""

    def __init__(
        self,
        model: str,
        *,
        nodes: int = 6,
        brokers: int = 2,
        spans: list[tuple[int, int]] | None = None,  # default: an even split over `nodes`
        run_dir: Path | None = None,
        models_dir: Path | None = None,
        topic_root: str = "jarvis",
        node_args: list[str] | None = None,  # extra flags for every `jarvis node`
        threads_per_node: int = 1,
        ready_timeout: float = 120.0,  # seconds for every node to announce itself
    ) -> None:
        self.model = model
        self.n_nodes = nodes
        self.n_brokers = brokers
        self.spans = spans
        self.run_dir = run_dir or default_run_dir()
        self.models_dir = models_dir
        self.topic_root = topic_root
        self.node_args = node_args or []
        self.threads_per_node = threads_per_node
        self.ready_timeout = ready_timeout
        self.brokers: list[MosquittoBroker] = []
        self.broker_procs: list[BrokerProc] = []
        self.nodes: list[NodeProc] = []
        self._popen: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def addresses(self) -> list[BrokerAddress]:
        """Every broker of the mesh."""
        return [BrokerAddress(b.host, b.port) for b in self.broker_procs]

    @property
    def broker_arg(self) -> str:
        """The `--broker` value for clients of this mesh."""
        return ",".join(str(a) for a in self.addresses)

    def start(self) -> Self:
        """Start brokers, then nodes; wait until all nodes are online."""
        from jarvis_mqtt.checkpoint import ModelDir

        if self.brokers or self.broker_procs or self.nodes:
            # A second start would put new processes in the records of the first ones,
            # which `stop` could then no longer reach.
            raise MeshError("this mesh is already started (`with LocalMesh(...)` starts it)")

        self.run_dir.mkdir(parents=True, exist_ok=True)
        md = ModelDir.open(
            self.model if self.models_dir is None else str(self.models_dir / self.model)
        )
        spans = self.spans or even_spans(md.num_layers, self.n_nodes)
        try:
            for i in range(self.n_brokers):
                b = MosquittoBroker(run_dir=self.run_dir / f"broker-{i}")
                b.start()
                self.brokers.append(b)
                a = b.address
                self.broker_procs.append(BrokerProc(a.host, a.port, b.pid, str(b.log_path)))
            for i, (s, e) in enumerate(spans):
                self.start_node(f"node-{i}", s, e)
            self.wait_ready([n.node_id for n in self.nodes])
        except BaseException:
            self.stop()
            raise
        return self

    def node_command(self, node_id: str, start: int, end: int) -> list[str]:
        """The command line of one node agent."""
        cmd = [
            sys.executable, "-m", "jarvis_mqtt.cli", "node",
            "--model", self.model, "--layers", f"{start}:{end}",
            "--broker", self.broker_arg, "--node-id", node_id,
            "--topic-root", self.topic_root, "--threads", str(self.threads_per_node),
        ]  # fmt: skip
        if self.models_dir is not None:
            cmd[3:3] = ["--models-dir", str(self.models_dir)]
        return cmd + self.node_args

    def start_node(self, node_id: str, start: int, end: int) -> NodeProc:
        """Start (or restart) one node agent process; it logs to the run dir.

        A node already running under `node_id` is stopped first: its record is replaced.
        """
        for old in [n for n in self.nodes if n.node_id == node_id]:
            stop_pid(old.pid)
            proc = self._popen.pop(old.pid, None)
            if proc is not None:
                proc.wait()
        log = self.run_dir / f"{node_id}.log"
        cmd = self.node_command(node_id, start, end)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        self._popen[proc.pid] = proc
        node = NodeProc(node_id, start, end, proc.pid, str(log), cmd)
        self.nodes = [n for n in self.nodes if n.node_id != node_id] + [node]
        return node

    def node(self, node_id: str) -> NodeProc:
        """The process record of a node."""
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(node_id)

    def wait_ready(self, node_ids: list[str], timeout: float | None = None) -> None:
        """Block until every node in `node_ids` has announced itself online."""
        import asyncio

        from jarvis_mqtt.client import wait_for_nodes

        try:
            pids = {n.node_id: n.pid for n in self.nodes}
            asyncio.run(
                wait_for_nodes(
                    self.addresses, self.topic_root, node_ids, timeout or self.ready_timeout, pids
                )
            )
        except MeshError as e:
            dead = [n.node_id for n in self.nodes if not _alive(n.pid)]
            tails = "".join(
                f"\n--- {n.node_id} ---\n" + Path(n.log).read_text(errors="replace")[-1500:]
                for n in self.nodes
                if n.node_id in dead
            )
            raise MeshError(f"{e}; exited: {dead or 'none'}{tails}") from e

    def stop(self) -> None:
        """Stop every node, then every broker, by pid."""
        for n in self.nodes:  # all at once: each takes a moment to leave the mesh cleanly
            with contextlib.suppress(ProcessLookupError):
                os.kill(n.pid, signal.SIGTERM)
        for n in self.nodes:
            stop_pid(n.pid)
            proc = self._popen.pop(n.pid, None)
            if proc is not None:
                proc.wait()
        for b in self.brokers:
            b.stop()
        for bp in self.broker_procs:  # brokers adopted from a state file
            if _alive(bp.pid):
                stop_pid(bp.pid)
        self.nodes, self.brokers, self.broker_procs = [], [], []

    def state(self) -> dict[str, Any]:
        """What `jarvis mesh status` shows and `jarvis mesh down` needs."""
        return {
            "model": self.model,
            "topic_root": self.topic_root,
            "brokers": [asdict(b) for b in self.broker_procs],
            "nodes": [asdict(n) for n in self.nodes],
        }

    def save(self) -> Path:
        """Write the state file so another process can stop this mesh."""
        path = self.run_dir / "state.json"
        path.write_text(json.dumps(self.state(), indent=2))
        return path

    @classmethod
    def load(cls, run_dir: Path | None = None) -> LocalMesh:
        """Adopt a mesh started by `jarvis mesh up`."""
        run_dir = run_dir or default_run_dir()
        path = run_dir / "state.json"
        if not path.exists():
            raise MeshError(f"no local mesh running (no {path})")
        st = json.loads(path.read_text())
        mesh = cls(st["model"], run_dir=run_dir, topic_root=st["topic_root"])
        mesh.broker_procs = [BrokerProc(**b) for b in st["brokers"]]
        mesh.nodes = [NodeProc(**n) for n in st["nodes"]]
        return mesh

    def status_rows(self) -> list[dict[str, Any]]:
        """One row per process: kind, id, pid, alive, address or layers."""
        rows: list[dict[str, Any]] = []
        for b in self.broker_procs:
            rows.append(
                {"kind": "broker", "id": f"{b.host}:{b.port}", "pid": b.pid, "alive": _alive(b.pid)}
            )
        for n in self.nodes:
            rows.append(
                {
                    "kind": "node",
                    "id": n.node_id,
                    "pid": n.pid,
                    "alive": _alive(n.pid),
                    "layers": f"[{n.start}, {n.end})",
                }
            )
        return rows

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
