"""`jarvis plan`: which node should host which layers of a model, over the capacity offered.

    jarvis plan --model NAME [--nodes-json FILE | --broker HOST:PORT,...] [--replication R]
                [--overhead-mb MB] [--kv-tokens N] [--critical 0,29] [--json]
    jarvis plan --model NAME --apply [--watch [--debounce S]] [--broker ...]

Nodes come from a JSON file, else from the retained statuses of contributors on the mesh
(`jarvis node --contribute` announces `memory_bytes`, `cores` and a measured `sec_per_layer`).
The file is a list (or `{"nodes": [...]}`) of objects with `node_id` (or `node`) and either the
capacity keys themselves or a `capacity` object holding them, so a `NodeStatus`, a row of
`jarvis inspect nodes --json`, or a hand-written `{"node_id": "s1", "memory_gb": 155,
"cores": 8}` all work. Entries marked offline are skipped.

The plan is `placement.plan`, shown next to the two baselines of `placement.compare`. With
`--apply` it is published as each contributor's retained assignment (`plan_apply`); with
`--watch` too, it is redone whenever contributors join or leave. This module only reads inputs
and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jarvis_mqtt.errors import ConfigError, JarvisError
from jarvis_mqtt.inspect import _connection_flags  # the same connection flags as `inspect`
from jarvis_mqtt.membership import parse_layers
from jarvis_mqtt.placement import (
    ModelSpec,
    NodeSpec,
    PlacementError,
    Plan,
    Score,
    compare,
    core_seconds,
    from_spans,
    plan,
)
from jarvis_mqtt.placement_apply import keep_stable
from jarvis_mqtt.placement_specs import fmt_bytes

if TYPE_CHECKING:  # checkpoint brings torch: keep building the `jarvis` parser quick
    from rich.table import Table

    from jarvis_mqtt.checkpoint import ModelDir

DEFAULT_OVERHEAD_MB = 256.0  # a node agent's Python, torch and buffers, besides layers and KV
DEFAULT_KV_TOKENS = 2048  # KV reserved per hosted layer: one session of the agent's max length


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `plan` to the `jarvis` subcommands."""
    p = sub.add_parser(
        "plan",
        parents=[_connection_flags()],
        help="place a model's layers over the nodes offering capacity (prints the plan)",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--model", required=True, help="model name (as imported) or directory")
    p.add_argument(
        "--nodes-json", metavar="FILE", help="nodes to plan over (default: live contributors)"
    )
    p.add_argument("--replication", type=_positive, default=1, help="copies of each layer")
    p.add_argument(
        "--overhead-mb", type=float, default=DEFAULT_OVERHEAD_MB,
        help=f"memory a hosting node needs besides layers and KV (default {DEFAULT_OVERHEAD_MB})",
    )  # fmt: skip
    p.add_argument(
        "--kv-tokens", type=int, default=DEFAULT_KV_TOKENS,
        help=f"KV cache reserved per hosted layer, in tokens (default {DEFAULT_KV_TOKENS})",
    )  # fmt: skip
    p.add_argument(
        "--critical", default=None, metavar="LAYERS",
        help="critical layers, e.g. 0,29 (default: criticality.json, else first and last)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the plan and baselines as JSON")
    p.add_argument(
        "--apply", action="store_true",
        help="publish the plan over the live contributors as their retained assignments",
    )  # fmt: skip
    p.add_argument(
        "--watch", action="store_true",
        help="with --apply: stay up and re-plan when contributors join or leave",
    )  # fmt: skip
    p.add_argument(
        "--debounce", type=float, default=2.0, metavar="S",
        help="with --watch: seconds membership must be still before re-planning (default 2)",
    )  # fmt: skip
    p.set_defaults(func=cmd_plan)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def cmd_plan(a: argparse.Namespace) -> int:
    """Run `jarvis plan`."""
    from jarvis_mqtt.checkpoint import ModelDir

    if a.watch and not a.apply:
        raise ConfigError("--watch goes with --apply")
    if a.apply and (a.nodes_json or a.json):
        raise ConfigError("--apply plans over the live contributors: no --nodes-json or --json")
    root = Path(a.models_dir) if getattr(a, "models_dir", None) else None
    md = ModelDir.open(a.model if root is None else str(root / a.model))
    critical = parse_layers(a.critical, "--critical") if a.critical else None
    if a.apply:
        return _cmd_apply(a, md, root, critical)
    model = ModelSpec.from_model_dir(md, critical)
    if a.nodes_json:
        try:
            data = json.loads(Path(a.nodes_json).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"--nodes-json {a.nodes_json}: {e}") from e
        entries = _entries(data)
    else:
        entries = _live_entries(a, md.name)
    nodes, notes = nodes_from_entries(entries, bench_scale=_bench_scale(md, entries, root))
    scores = compare(model, nodes, **_plan_kw(a))
    best = scores["planner"]
    if a.json:
        print(json.dumps(_json(scores, notes)))
        return 0 if best.fits else 2
    if best.plan is None:
        raise PlacementError(best.reason, missing_bytes=best.missing_bytes)
    from rich.console import Console

    console = Console()
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(plan_table(best.plan, nodes))
    console.print(best.plan.summary())
    for line in baseline_lines(scores):
        console.print(line)
    return 0


def _plan_kw(a: argparse.Namespace) -> dict[str, Any]:
    return dict(
        replication=a.replication,
        overhead_bytes=int(a.overhead_mb * 2**20),
        kv_tokens=a.kv_tokens,
    )


def _cmd_apply(
    a: argparse.Namespace, md: ModelDir, root: Path | None, critical: list[int] | None
) -> int:
    """`--apply [--watch]`: publish the plan as assignments (and keep it current)."""
    import signal

    from jarvis_mqtt.checkpoint import MANIFEST, sha256_file
    from jarvis_mqtt.inspect import connection_from_args
    from jarvis_mqtt.plan_apply import ApplySettings, apply_once, watch

    conn = connection_from_args(a)
    manifest = sha256_file(md.path / MANIFEST)
    settings = ApplySettings(model=md.name, manifest=manifest, debounce=a.debounce)
    planner = make_planner(md, root, critical, **_plan_kw(a))

    def out(line: str) -> None:
        print(line, flush=True)

    if not a.watch:
        asyncio.run(apply_once(conn, settings, planner, out))
        return 0

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await watch(conn, settings, planner, stop, out)

    asyncio.run(run())
    return 0


def make_planner(
    md: ModelDir, root: Path | None, critical: list[int] | None, **kw: Any
) -> Callable[[Sequence[Mapping[str, Any]], Mapping[str, tuple[int, int]]], tuple[Plan, list[str]]]:
    """The planner `--apply` runs on every change: the best plan, or the one in place while
    it is about as good (`placement_apply.keep_stable`), and notes on the nodes.

    The model spec is read each time, so a `criticality.json` written meanwhile counts.
    """

    def planner(
        entries: Sequence[Mapping[str, Any]], in_place: Mapping[str, tuple[int, int]]
    ) -> tuple[Plan, list[str]]:
        model = ModelSpec.from_model_dir(md, critical)
        nodes, notes = nodes_from_entries(entries, bench_scale=_bench_scale(md, entries, root))
        new = plan(model, nodes, **kw)
        try:
            kept = from_spans(model, nodes, in_place, **kw) if in_place else None
        except PlacementError:  # a node of it left, or it no longer fits: plan anew
            kept = None
        return keep_stable(new, kept), notes

    return planner


# -- reading nodes -------------------------------------------------------------------------------


def _entries(data: Any) -> list[Mapping[str, Any]]:
    if isinstance(data, Mapping) and "nodes" in data:
        data = data["nodes"]
    if not isinstance(data, list) or not all(isinstance(d, Mapping) for d in data):
        raise ConfigError('--nodes-json: expected a list of node objects (or {"nodes": [...]})')
    return list(data)


def _live_entries(a: argparse.Namespace, model: str) -> list[Mapping[str, Any]]:
    """The retained statuses of live nodes, as entries for planning `model`."""
    from jarvis_mqtt.inspect import collect_nodes, connection_from_args
    from jarvis_mqtt.inspect_nodes import node_state
    from jarvis_mqtt.plan_apply import leftover_capacity

    board = asyncio.run(collect_nodes(connection_from_args(a)))
    now = time.time()
    return [
        {"node_id": st.node_id, "capacity": leftover_capacity(st, model)}
        for st in board.statuses.values()
        if node_state(st, now) == "online"
    ]


def _capacity(entry: Mapping[str, Any]) -> dict[str, Any]:
    cap = dict(entry.get("capacity") or entry)
    if "memory_bytes" not in cap and "memory_gb" in cap:
        cap["memory_bytes"] = int(float(cap["memory_gb"]) * 1e9)
    return cap


def nodes_from_entries(
    entries: Sequence[Mapping[str, Any]], *, bench_scale: Mapping[str, float] | None = None
) -> tuple[list[NodeSpec], list[str]]:
    """Nodes from file or status entries, and notes on what was skipped or estimated.

    Nodes that measured no speed are estimated from their cores in the unit of those that did
    (`core_seconds`).
    """
    notes: list[str] = []
    usable: list[tuple[str, dict[str, Any]]] = []
    for e in entries:
        node_id = str(e.get("node_id") or e.get("node") or "")
        if not node_id:
            notes.append("an entry without node_id skipped")
            continue
        if e.get("online") is False or e.get("state", "online") != "online":
            continue
        cap = _capacity(e)
        if "memory_bytes" not in cap:
            notes.append(f"{node_id}: announces no memory_bytes (not a contributor), skipped")
            continue
        usable.append((node_id, cap))
    core_sec = core_seconds(cap for _, cap in usable)
    nodes = []
    for node_id, cap in usable:
        try:
            nodes.append(
                NodeSpec.from_capacity(
                    node_id, cap, core_sec_per_layer=core_sec, bench_scale=bench_scale
                )
            )
        except JarvisError as e:  # one bad announcement must not hide the other nodes
            notes.append(f"{e}; skipped")
    estimated = [n.node_id for n in nodes if not n.measured]
    if estimated and len(estimated) < len(nodes):
        notes.append(f"speed of {', '.join(estimated)} estimated from cores")
    if not nodes:
        raise PlacementError("no node offers capacity (start some with `jarvis node --contribute`)")
    return nodes, notes


def _bench_scale(
    md: ModelDir, entries: Sequence[Mapping[str, Any]], root: Path | None
) -> dict[str, float]:
    """Per bench model, how much slower a layer of `md` should be (ratio of layer bytes)."""
    from jarvis_mqtt.checkpoint import ModelDir

    mine = md.shard_bytes(0, md.num_layers, include_stage=False) / md.num_layers
    scale: dict[str, float] = {}
    for e in entries:
        bench = str(_capacity(e).get("bench_model") or "")
        if not bench or bench in scale:
            continue
        if bench == md.name:
            scale[bench] = 1.0
            continue
        try:
            other = ModelDir.open(bench if root is None else str(root / bench))
            theirs = other.shard_bytes(0, other.num_layers, include_stage=False)
            scale[bench] = mine / (theirs / other.num_layers)
        except JarvisError:
            scale[bench] = 1.0  # unknown here: take the measurement as it is
    return scale


# -- printing ------------------------------------------------------------------------------------


def plan_table(plan: Plan, nodes: Sequence[NodeSpec]) -> Table:
    """The plan as a rich table: one row per node, the bottleneck in bold."""
    from rich import box
    from rich.table import Table

    t = Table(title=f"plan for {plan.model}", box=box.SIMPLE_HEAD)
    for col, right in (
        ("node", False), ("copy", True), ("layers", True), ("n", True), ("weights", True),
        ("need / free", True), ("use", True), ("s/token", True), ("speed", False),
    ):  # fmt: skip
        t.add_column(col, justify="right" if right else "left")
    slowest = plan.bottleneck
    for p in plan.placements:
        style = "bold red" if p is slowest else ""
        t.add_row(
            p.node_id, str(p.copy + 1), f"[{p.start},{p.end})", str(p.layers),
            fmt_bytes(p.weight_bytes),
            f"{fmt_bytes(p.need_bytes)} / {fmt_bytes(p.memory_bytes)}",
            f"{p.need_bytes / p.memory_bytes:.0%}", f"{p.sec_per_token:.4g}",
            "measured" if p.measured else "estimated", style=style,
        )  # fmt: skip
    by_id = {n.node_id: n for n in nodes}
    for node_id in plan.idle:
        mem = fmt_bytes(by_id[node_id].memory_bytes) if node_id in by_id else "?"
        t.add_row(node_id, "", "idle", "0", "", f"- / {mem}", "", "", "", style="dim")
    return t


def baseline_lines(scores: Mapping[str, Score]) -> list[str]:
    """One line per baseline: its throughput against the planner's, or why it does not fit."""
    best = scores["planner"].tokens_per_s
    names = {"equal": "equal split", "memory": "memory-proportional split"}
    out = []
    for method, name in names.items():
        s = scores[method]
        if s.tokens_per_s is None:
            out.append(f"{name}: does not fit ({s.reason})")
        else:
            ratio = f", planner ×{best / s.tokens_per_s:.2f}" if best else ""
            out.append(f"{name}: {s.tokens_per_s:.4g} tokens/s{ratio}")
    return out


def _json(scores: Mapping[str, Score], notes: list[str]) -> dict[str, Any]:
    best = scores["planner"]
    return {
        "fits": best.fits,
        "plan": best.plan.to_dict() if best.plan else None,
        "compare": {
            m: {
                "fits": s.fits,
                "tokens_per_s": s.tokens_per_s,
                "bottleneck_s": s.bottleneck_s,
                "reason": s.reason,
                "missing_bytes": s.missing_bytes,
            }
            for m, s in scores.items()
        },
        "notes": notes,
    }
