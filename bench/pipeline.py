"""The MQTT pipeline: a real mesh (6 node processes, 2 Mosquitto brokers) against one process.

(a) efficiency: decode tok/s through the mesh ÷ the single-process runtime, interleaved with
    the same split chained by OS pipes (`pipes.py`: the ceiling for any transport here);
(b) added latency per hop: an echo relay for 4 KiB activations, and the node-to-node transfer
    times stamped in the routes of (a);
(c) 8 concurrent sessions ÷ 1 session on the same mesh (node batching);
(d) each node's RSS against the bytes of its shard, and the RSS of a bare interpreter.
Every process started here is stopped by its pid in a `finally`, even when a figure fails.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import relay
from bench.pipes import PipeChain, spans_of
from bench.procs import baseline_rss, cpu_snapshot, machine, mib, proc_status, rss_figure
from bench.report import Figure, Section, Stats, percentile
from bench.runtime import Ours, prompt_ids
from jarvis_mqtt import wire
from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.client import RemoteModel
from jarvis_mqtt.mesh import LocalMesh
from jarvis_mqtt.sampling import SamplingParams

NODES = 6
BROKERS = 2
THREADS_PER_NODE = 1
PROMPT_TOKENS = 64
DECODE_TOKENS = 48  # per timed run of (a)
ROUNDS = 4  # timed rounds of (a), after one warm-up, interleaved mesh / 1 thread / 2 threads
SESSIONS = 8
SESSION_TOKENS = 32  # decode tokens per session in (c)
SESSION_ROUNDS = 3  # timed rounds of (c), after one warm-up, interleaved 1 / 8 sessions
ECHO_FLOATS = 1024  # float32: a 4 KiB activation
ECHO_COUNT = 300
ECHO_WARMUP = 30
ECHO_IDLE = 0.05  # seconds: about a token's time in the mesh, what a node waits between hops
ECHO_IDLE_COUNT = 60
ECHO_IDLE_WARMUP = 5
TARGET_EFFICIENCY = 0.85
TARGET_HOP_MS = 0.6
TARGET_CONCURRENCY = 3.0


class TracedRemoteModel(RemoteModel):
    """A RemoteModel that keeps each result payload, to read the route timestamps afterwards.

    `StepResult.route` keeps only each hop's compute time; the wire route also has when each
    node received and sent on, which gives the transfer time between nodes.
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.payloads: list[bytes] = []

    def _on_result(self, payload: bytes | memoryview) -> None:
        super()._on_result(payload)
        self.payloads.append(bytes(payload))

    def routes(self) -> list[tuple[wire.RouteHop, ...]]:
        """Routes of the results kept so far (decoded now, outside the timed loops)."""
        out = []
        for p in self.payloads:
            msg = wire.decode(p, max_bytes=1 << 30)
            if isinstance(msg, wire.ResultMessage):
                out.append(msg.route)
        return out


@dataclass
class StepTimes:
    """Per decode step through the mesh: client wall time and the route it took."""

    walls: list[float] = field(default_factory=list)  # seconds, client view


async def mesh_decode(
    rm: TracedRemoteModel,
    ids: list[int],
    n: int,
    sid: str,
    times: StepTimes | None = None,
    pids: dict[str, int] | None = None,
) -> tuple[float, list[int], dict[str, float]]:
    """Greedy decode through the mesh after an untimed prefill: tok/s, the tokens, CPU/token."""
    res = await rm.step(sid, ids, 0)
    tok = int(res.logits.argmax())
    toks = [tok]
    cpu0 = cpu_snapshot(pids or {})
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        res = await rm.step(sid, [tok], len(ids) + i)
        tok = int(res.logits.argmax())
        if times is not None:
            times.walls.append(time.perf_counter() - t)
        toks.append(tok)
    rate = n / (time.perf_counter() - t0)
    cpu = cpu_per_token(cpu0, cpu_snapshot(pids or {}), n) if pids else {}
    await rm.free([sid])
    return rate, toks, cpu


async def concurrent_generate(
    rm: RemoteModel, k: int, n: int, vocab: int, pids: dict[str, int] | None = None
) -> tuple[float, dict[str, float]]:
    """Aggregate decode tok/s of `k` concurrent `generate()` calls of `n` tokens each.

    Decode only: tokens after each session's first (the prefill's) ÷ the time from the first
    session's first token to the last session's last token, so slow starts count against it.
    CPU per token is counted from the moment every session has its first token.
    """
    stamps: list[list[float]] = [[] for _ in range(k)]
    cpu0: dict[str, float] = {}
    started: list[float] = []

    async def one(i: int) -> None:
        ids = prompt_ids(PROMPT_TOKENS, vocab, seed=100 + i)
        async for _ in rm.generate(ids, SamplingParams(max_new_tokens=n)):
            stamps[i].append(time.perf_counter())
            if len(stamps[i]) == 1 and all(stamps) and pids:
                cpu0.update(cpu_snapshot(pids))
                started.append(time.perf_counter())

    await asyncio.gather(*(one(i) for i in range(k)))
    decoded = sum(len(s) - 1 for s in stamps)
    rate = decoded / (max(s[-1] for s in stamps) - min(s[0] for s in stamps))
    cpu: dict[str, float] = {}
    if pids and started:
        after = sum(1 for s in stamps for t in s if t > started[0])
        cpu = cpu_per_token(cpu0, cpu_snapshot(pids), max(1, after))
    return rate, cpu


def cpu_per_token(
    before: dict[str, float], after: dict[str, float], tokens: int
) -> dict[str, float]:
    """CPU milliseconds per generated token of each process kind, and of the whole machine."""
    per = {k: (after[k] - before[k]) * 1e3 / tokens for k in before if k != "wall"}
    nodes = sum(v for k, v in per.items() if k.startswith("node-"))
    brokers = sum(v for k, v in per.items() if k.startswith("broker-"))
    wall = (after["wall"] - before["wall"]) * 1e3 / tokens
    return {
        "wall_ms": round(wall, 2),
        "nodes_ms": round(nodes, 2),
        "brokers_ms": round(brokers, 2),
        "client_ms": round(per["client"], 2),
        "total_ms": round(nodes + brokers + per["client"], 2),
        "cores_busy": round((nodes + brokers + per["client"]) / wall, 2),
    }


async def node_counters(rm: RemoteModel, after: float, timeout: float = 5.0) -> dict[str, Any]:
    """Each node's (steps, tokens) counters from a heartbeat sent after wall time `after`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = rm.view.live(rm.model)
        if live and all(s.time > after for s in live):
            return {s.node_id: (s.load.get("steps", 0), s.load.get("tokens", 0)) for s in live}
        await asyncio.sleep(0.05)
    return {}


def transfer_stats(
    routes: Sequence[Sequence[wire.RouteHop]], walls: Sequence[float]
) -> dict[str, Any]:
    """Node-to-node transfer times (next t_in - previous t_out) and a per-token breakdown."""
    gaps: list[float] = []
    by_edge: dict[str, list[float]] = {}
    compute: list[float] = []
    span: list[float] = []
    for route in routes:
        for a, b in itertools.pairwise(route):
            g = (b.t_in - a.t_out) * 1e3
            gaps.append(g)
            by_edge.setdefault(f"{a.node}->{b.node}", []).append(g)
        compute.append(sum(h.t_out - h.t_in for h in route) * 1e3)
        span.append((route[-1].t_out - route[0].t_in) * 1e3)
    wall = [w * 1e3 for w in walls]
    return {
        "gaps_ms": gaps,
        "by_edge_median_ms": {k: round(statistics.median(v), 3) for k, v in by_edge.items()},
        "compute_ms": statistics.median(compute) if compute else float("nan"),
        "transfers_ms": statistics.median(s - c for s, c in zip(span, compute, strict=True))
        if span
        else float("nan"),
        "wall_ms": statistics.median(wall) if wall else float("nan"),
        "client_ms": statistics.median(w - s for w, s in zip(wall, span, strict=False))
        if wall and span
        else float("nan"),
    }


def _cpu_figure(sec: Section, key: str, label: str, cpu: dict[str, float]) -> None:
    sec.add(
        Figure(
            key=key, label=label, value=f"{cpu['total_ms']:.1f} ms = {cpu['nodes_ms']:.1f} + "
            f"{cpu['brokers_ms']:.1f} + {cpu['client_ms']:.1f}", inputs=cpu,
            how=f"CPU time per token (/proc/PID/stat): 6 nodes + 2 brokers + client; "
            f"{cpu['wall_ms']:.1f} ms wall per token, so {cpu['cores_busy']:.2f} of the "
            f"{os.cpu_count()} cores busy",
        )
    )  # fmt: skip


async def measure_mesh(
    md: ModelDir,
    mesh: LocalMesh,
    local: Ours,
    pipes: PipeChain,
    sec: Section,
    pids: dict[str, int],
) -> None:
    """(a), the route transfers of (b), and (c), with one client on the running mesh."""
    vocab = md.config["vocab_size"]
    ids = prompt_ids(PROMPT_TOKENS, vocab)
    torch.set_num_threads(1)  # the client's embed and head run on one thread, like every node
    async with TracedRemoteModel(md, mesh.addresses, topic_root=mesh.topic_root) as rm:
        rm.tokenizer.eos_token_ids = frozenset()  # every generate() runs its full length
        await rm.wait_ready(60)
        samples: dict[str, list[float]] = {
            "mesh": [], "local_1t": [], "local_2t": [], "pipes": []
        }  # fmt: skip
        tokens: dict[str, list[int]] = {}
        times = StepTimes()
        for r in range(1 + ROUNDS):
            timed = r > 0
            if timed:
                rm.payloads.clear()  # keep the routes of the last round only
            rate, toks, cpu1 = await mesh_decode(
                rm, ids, DECODE_TOKENS, f"eff{r}", times if timed else None, pids
            )
            tokens.setdefault("mesh", toks)
            if timed:
                samples["mesh"].append(rate)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                # In a thread: the client's loop keeps reading heartbeats and acks meanwhile.
                rate, toks = await asyncio.to_thread(local.decode, ids, DECODE_TOKENS, f"l{r}")
                torch.set_num_threads(1)
                tokens.setdefault("local", toks)
                if timed:
                    samples[f"local_{threads}t"].append(rate)
            rate, toks = await asyncio.to_thread(pipes.decode, ids, DECODE_TOKENS, f"p{r}")
            tokens.setdefault("pipes", toks)
            if timed:
                samples["pipes"].append(rate)
            await node_counters(rm, time.time())  # a fresh view before the next mesh round
        routes = rm.routes()[-DECODE_TOKENS:]
        tr = transfer_stats(routes, times.walls[-DECODE_TOKENS:])
        stats = {k: Stats(tuple(v)) for k, v in samples.items()}
        agree = sum(a == b for a, b in zip(tokens["mesh"], tokens["local"], strict=True))
        agree_pipes = sum(a == b for a, b in zip(tokens["pipes"], tokens["local"], strict=True))
        _efficiency_figures(sec, stats, agree, len(tokens["mesh"]), tr)
        _pipe_figures(sec, stats, agree_pipes, len(tokens["pipes"]))
        _cpu_figure(sec, "cpu_per_token_one_session", "CPU per token, 1 session", cpu1)

        one: list[float] = []
        many: list[float] = []
        batches: dict[str, list[tuple[int, int]]] = {}
        for r in range(1 + SESSION_ROUNDS):
            timed = r > 0
            rate1, _ = await concurrent_generate(rm, 1, SESSION_TOKENS, vocab)
            before = await node_counters(rm, time.time())
            rate8, cpu8 = await concurrent_generate(rm, SESSIONS, SESSION_TOKENS, vocab, pids)
            after = await node_counters(rm, time.time())
            if timed:
                one.append(rate1)
                many.append(rate8)
                for node, (steps, toks) in after.items():
                    if node in before:
                        b_steps, b_toks = before[node]
                        batches.setdefault(node, []).append((steps - b_steps, toks - b_toks))
        _concurrency_figures(sec, Stats(tuple(one)), Stats(tuple(many)), batches)
        _cpu_figure(
            sec, "cpu_per_token_eight_sessions", f"CPU per token, {SESSIONS} sessions", cpu8
        )


def _pipe_figures(sec: Section, s: dict[str, Stats], agree: int, n: int) -> None:
    pipes, mesh, l1 = s["pipes"], s["mesh"], s["local_1t"]
    sec.add(
        Figure(
            key="pipes_decode_tok_s", label="the same split chained by pipes",
            value=round(pipes.best, 2), median=round(pipes.median, 2), unit="tok/s",
            how=f"{NODES} processes x 1 thread, each its span of layers, passing the hidden "
            f"state by OS pipe (bench/pipes.py); embed, head and sampling in the bench "
            f"process; no broker, MQTT or event loop; greedy tokens = single process: "
            f"{agree}/{n}",
        )
    )  # fmt: skip
    sec.add(
        _ratio(
            "efficiency_pipes", "ceiling: pipes / single process 1t", pipes, l1,
            "context: what cutting the model across processes costs on this host, before "
            "any transport; the efficiency a mesh could reach here",
        )
    )  # fmt: skip
    sec.add(
        _ratio(
            "mesh_vs_pipes", "mesh / pipes", mesh, pipes,
            "context: what the brokers, MQTT, the wire format and the agents cost on top",
        )
    )  # fmt: skip


def _ratio(
    key: str, label: str, num: Stats, den: Stats, how: str, target: float | None = None
) -> Figure:
    """num ÷ den, best ÷ best (median ÷ median), with its inputs."""
    return Figure(
        key=key, label=label, value=round(num.best / den.best, 3),
        median=round(num.median / den.median, 3), target=target,
        inputs={"numerator_best": num.best, "denominator_best": den.best,
                "numerator_median": num.median, "denominator_median": den.median},
        how=how,
    )  # fmt: skip


def _efficiency_figures(
    sec: Section, s: dict[str, Stats], agree: int, n: int, tr: dict[str, Any]
) -> None:
    mesh, l1, l2 = s["mesh"], s["local_1t"], s["local_2t"]
    setting = f"{PROMPT_TOKENS}-token prompt, {DECODE_TOKENS} greedy tokens"
    rows = (
        (
            "mesh_decode_tok_s", "decode through the mesh", mesh,
            f"{NODES} node processes x {THREADS_PER_NODE} thread, {BROKERS} brokers; client "
            f"embed + head on 1 thread; RemoteModel.step loop; {setting}",
        ),
        (
            "local_decode_1t_tok_s", "single process, 1 thread", l1,
            f"our runtime in the bench process; {ROUNDS} rounds interleaved with the mesh",
        ),
        ("local_decode_2t_tok_s", "single process, 2 threads", l2, "same, torch threads = 2"),
    )  # fmt: skip
    for key, label, st, how in rows:
        sec.add(
            Figure(
                key=key, label=label, value=round(st.best, 2), median=round(st.median, 2),
                unit="tok/s", how=how,
            )
        )  # fmt: skip
    sec.add(
        _ratio(
            "efficiency", "efficiency: mesh / single process 1t", mesh, l1,
            "same thread budget: a session's layers run one node at a time, each node on 1 "
            "thread, so the like-for-like single process has 1 thread",
            target=TARGET_EFFICIENCY,
        )
    )  # fmt: skip
    sec.add(
        _ratio(
            "efficiency_vs_2_threads", "mesh / single process 2t", mesh, l2,
            "context: the whole 2-core machine given to one process instead",
        )
    )  # fmt: skip
    sec.add(
        Figure(
            key="mesh_tokens_agree", label="greedy tokens: mesh = single process",
            value=f"{agree}/{n}", how="same prompt, first round",
        )
    )  # fmt: skip
    gaps = tr["gaps_ms"]
    if gaps:
        sec.add(
            Figure(
                key="route_transfer_ms_median", label="in-pipeline transfer per hop (median)",
                value=round(statistics.median(gaps), 3), unit="ms", target=TARGET_HOP_MS,
                op="<=", inputs={"p90": round(percentile(gaps, 90), 3), "hops": len(gaps)},
                how=f"next node t_in - previous t_out from the routes of the last mesh round "
                f"({len(gaps)} hops, 2304-byte activations); p90 {percentile(gaps, 90):.3f} ms",
            )
        )  # fmt: skip
        sec.add(
            Figure(
                key="route_transfer_ms_p90", label="in-pipeline transfer per hop (p90)",
                value=round(percentile(gaps, 90), 3), unit="ms",
                how="includes encode, publish to 2 brokers, delivery, dedup, decode",
            )
        )  # fmt: skip
        sec.add(
            Figure(
                key="per_token_breakdown_ms", label="per token: wall = compute + transfers + rest",
                value=f"{tr['wall_ms']:.1f} = {tr['compute_ms']:.1f} + {tr['transfers_ms']:.1f} "
                f"+ {tr['client_ms']:.1f}", unit="ms",
                inputs={k: round(tr[k], 3) for k in ("wall_ms", "compute_ms", "transfers_ms",
                                                     "client_ms")},
                how="medians: node compute (t_out - t_in summed), node-to-node, and the rest "
                "(client embed + head + client<->first/last node)",
            )
        )  # fmt: skip
        sec.context["route_transfer_median_ms_by_edge"] = tr["by_edge_median_ms"]
    else:
        sec.add(
            Figure(
                key="route_transfer_ms_median", label="in-pipeline transfer per hop (median)",
                value="n/a", how="no routes captured (RemoteModel._on_result changed?)",
            )
        )  # fmt: skip
    sec.context["efficiency_samples_tok_s"] = {
        k: [round(x, 2) for x in v.samples] for k, v in s.items()
    }


def _concurrency_figures(
    sec: Section, one: Stats, many: Stats, batches: dict[str, list[tuple[int, int]]]
) -> None:
    sec.add(
        Figure(
            key="one_session_tok_s", label="1 session", value=round(one.best, 2),
            median=round(one.median, 2), unit="tok/s",
            how=f"one RemoteModel.generate(), {SESSION_TOKENS} tokens, EOS off, same mesh and "
            "client; decode tokens ÷ (last token - first token)",
        )
    )  # fmt: skip
    sec.add(
        Figure(
            key="eight_sessions_tok_s", label=f"{SESSIONS} sessions, aggregate",
            value=round(many.best, 2), median=round(many.median, 2), unit="tok/s",
            how=f"{SESSIONS} concurrent RemoteModel.generate() in one asyncio client, "
            f"{SESSION_TOKENS} tokens each; decode tokens ÷ (last token of any - first token "
            "of any)",
        )
    )  # fmt: skip
    sec.add(
        Figure(
            key="concurrency_ratio", label=f"{SESSIONS} sessions / 1 session",
            value=round(many.best / one.best, 3), median=round(many.median / one.median, 3),
            target=TARGET_CONCURRENCY,
            inputs={"numerator_best": many.best, "denominator_best": one.best,
                    "numerator_median": many.median, "denominator_median": one.median},
            how=f"{SESSION_ROUNDS} rounds after a warm-up, 1 and {SESSIONS} sessions interleaved",
        )
    )  # fmt: skip
    # Each round, every node sees each session's prompt once and each decode token once; only
    # the number of steps the prompts took (1 to SESSIONS) is unknown, hence a range. A session
    # decodes one token per step, so its SESSION_TOKENS - 1 decode steps bound the range too.
    decode_tokens = SESSIONS * (SESSION_TOKENS - 1)
    expected = decode_tokens + SESSIONS * PROMPT_TOKENS
    lo, hi, off = [], [], 0
    for rounds in batches.values():
        for steps, toks in rounds:
            off += toks != expected
            lo.append(decode_tokens / max(1, steps - 1))
            hi.append(decode_tokens / max(SESSION_TOKENS - 1, steps - SESSIONS))
    if lo:
        sec.add(
            Figure(
                key="decode_rows_per_forward", label=f"decode rows per node forward, {SESSIONS} "
                "sessions", value=f"{statistics.mean(lo):.2f}-{statistics.mean(hi):.2f}",
                inputs={"low": round(statistics.mean(lo), 3),
                        "high": round(statistics.mean(hi), 3),
                        "node_rounds_with_unexpected_token_count": off},
                how=f"from node heartbeat counters (steps, tokens) around each {SESSIONS}-session "
                f"run, prompts' steps (1 to {SESSIONS}) taken out; {SESSIONS} = perfect batching",
            )
        )  # fmt: skip
    sec.context["node_counter_deltas_steps_tokens"] = batches


def echo_figures(sec: Section, rtts2: list[float], rtts1: list[float], idle2: list[float]) -> None:
    """(b): per hop = round trip / 2."""
    hops2 = [r / 2 * 1e3 for r in rtts2]
    hops1 = [r / 2 * 1e3 for r in rtts1]
    med, p90 = statistics.median(hops2), percentile(hops2, 90)
    how = (
        f"echo relay process, {ECHO_FLOATS * 4}-byte float32 activations in the wire format, "
        f"{ECHO_COUNT} sequential round trips ÷ 2"
    )
    sec.add(
        Figure(
            key="hop_latency_ms_median", label="added latency per hop, 4 KiB (median)",
            value=round(med, 3), unit="ms", target=TARGET_HOP_MS, op="<=",
            inputs={"p90": round(p90, 3), "round_trips": len(hops2)},
            how=f"{how}, {BROKERS} brokers",
        )
    )  # fmt: skip
    sec.add(
        Figure(
            key="hop_latency_ms_p90", label="added latency per hop, 4 KiB (p90)",
            value=round(p90, 3), unit="ms", target=TARGET_HOP_MS, op="<=",
            how="same runs",
        )
    )  # fmt: skip
    sec.add(
        Figure(
            key="hop_latency_1_broker_ms_median", label="per hop, 1 broker only (median)",
            value=round(statistics.median(hops1), 3), unit="ms",
            inputs={"p90": round(percentile(hops1, 90), 3)},
            how=f"context: relay and publisher on one broker; p90 {percentile(hops1, 90):.3f}",
        )
    )  # fmt: skip
    cold = [r / 2 * 1e3 for r in idle2]
    idle_ms = f"{ECHO_IDLE * 1e3:.0f} ms"
    sec.add(
        Figure(
            key="hop_latency_after_idle_ms_median", label=f"per hop after {idle_ms} idle (median)",
            value=round(statistics.median(cold), 3), unit="ms",
            inputs={"p90": round(percentile(cold, 90), 3), "round_trips": len(cold)},
            how=(
                f"context: {BROKERS} brokers, {idle_ms} of sleep (untimed) before each ping, "
                f"as nodes and brokers wait between tokens; p90 {percentile(cold, 90):.3f}"
            ),
        )
    )  # fmt: skip


def memory_figures(sec: Section, md: ModelDir, mesh: LocalMesh) -> None:
    """(d): each node's RSS next to its shard's bytes, and bare interpreters for scale."""
    torch_only = baseline_rss("torch")
    agent_only = baseline_rss("node_agent.agent")
    for n in sorted(mesh.nodes, key=lambda n: n.start):
        st = proc_status(n.pid)
        shard = md.shard_bytes(n.start, n.end, include_stage=False)
        over = st["VmRSS"] - torch_only["VmRSS"]
        sec.add(
            Figure(
                key=f"rss_{n.node_id.replace('-', '_')}", label=f"{n.node_id} [{n.start},{n.end})"
                " RSS / shard", value=round(st["VmRSS"] / shard, 2), unit="x",
                inputs={"rss_bytes": st["VmRSS"], "shard_bytes": shard,
                        "rss_minus_torch_baseline_bytes": over,
                        "RssAnon": st["RssAnon"], "RssFile": st["RssFile"]},
                how=f"VmRSS {mib(st['VmRSS'])} MiB (anon {mib(st['RssAnon'])}, file "
                f"{mib(st['RssFile'])}) vs shard {mib(shard)} MiB; minus the import-torch "
                f"baseline: {mib(over)} MiB = {over / shard:.2f}x shard",
            )
        )  # fmt: skip
    sec.add(
        rss_figure(
            "baseline_rss_import_torch_bytes", "RSS, python + import torch", torch_only,
            "a fresh interpreter, no weights",
        )
    )  # fmt: skip
    sec.add(
        rss_figure(
            "baseline_rss_import_node_agent_bytes", "RSS, python + import node_agent",
            agent_only, "every module a node imports, no weights",
        )
    )  # fmt: skip


def run(md: ModelDir) -> Section:
    """Start the mesh, measure (a)-(d), stop every process whatever happens."""
    sec = Section("pipeline")
    sec.context["machine_at_start"] = machine()
    run_dir = Path(tempfile.mkdtemp(prefix="jarvis-bench-"))
    root = f"bench/{uuid.uuid4().hex[:8]}"
    mesh = LocalMesh(
        md.name, nodes=NODES, brokers=BROKERS, run_dir=run_dir, models_dir=md.path.parent,
        topic_root=root, threads_per_node=THREADS_PER_NODE,
    )  # fmt: skip
    relays = []
    try:
        t0 = time.monotonic()
        mesh.start()
        sec.context["mesh_start_seconds"] = round(time.monotonic() - t0, 1)
        sec.context["spans"] = {n.node_id: [n.start, n.end] for n in mesh.nodes}
        local = Ours.load(md)
        pids = {n.node_id: n.pid for n in mesh.nodes}
        pids.update({f"broker-{i}": b.pid for i, b in enumerate(mesh.broker_procs)})
        pids["client"] = os.getpid()
        with PipeChain(md, spans_of(md, NODES)) as pipes:
            asyncio.run(measure_mesh(md, mesh, local, pipes, sec, pids))
        del local
        memory_figures(sec, md, mesh)
        # (brokers, idle before each ping, round trips, warm-up), in echo_figures' order
        echo_runs = [
            (BROKERS, 0.0, ECHO_COUNT, ECHO_WARMUP),
            (1, 0.0, ECHO_COUNT, ECHO_WARMUP),
            (BROKERS, ECHO_IDLE, ECHO_IDLE_COUNT, ECHO_IDLE_WARMUP),
        ]
        rtts: list[list[float]] = []
        for i, (n, idle, count, warmup) in enumerate(echo_runs):
            brokers, echo = mesh.addresses[:n], f"{root}/echo{i}"
            proc = relay.start(brokers, echo, run_dir / "relay.log")
            relays.append(proc)
            rtts.append(
                asyncio.run(
                    relay.echo_latency(
                        brokers, echo, floats=ECHO_FLOATS, count=count, warmup=warmup, idle=idle
                    )
                )
            )
            relay.stop(proc)
        echo_figures(sec, *rtts)
    except BaseException:
        print(f"pipeline bench failed; logs in {run_dir}")
        raise
    finally:
        for proc in relays:
            if proc.poll() is None:
                relay.stop(proc)
        mesh.stop()
    sec.context.update(
        model=md.name, nodes=NODES, brokers=BROKERS, threads_per_node=THREADS_PER_NODE,
        run_dir=str(run_dir), machine_at_end=machine(),
    )  # fmt: skip
    return sec
