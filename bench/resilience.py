"""Stall at each failure kind: how long generation stops when a node or a broker dies.

For each fault a fresh local mesh (SmolLM2, two brokers) generates tokens; after a few the
fault is injected, and the stall is the longest gap between two tokens after it, next to the
median gap before it (the normal time per token). Lost tokens are counted against the same
generation with nothing failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.client import RemoteModel
from jarvis_mqtt.generate import LocalModel, TokenEvent
from jarvis_mqtt.mesh import LocalMesh
from jarvis_mqtt.sampling import SamplingParams

N = 24  # tokens per run
FAULT_AT = 8  # the fault comes after this many tokens
PROMPT = "Tell me about the history of the city of Paris."
TARGETS = {
    "node_sigkill": 0.5,
    "node_sigkill_replica": 0.5,
    "silent_cut": 2.0,
    "broker_sigkill": 0.1,
}


def _ids(md: ModelDir) -> list[int]:
    tok = md.tokenizer()
    return list(tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]), False))


def _served(ev: TokenEvent, layer: int) -> str:
    for hop in ev.route:
        start, end = hop["start"], hop["end"]
        assert isinstance(start, int) and isinstance(end, int)
        if start <= layer < end:
            return str(hop["node"])
    raise LookupError(f"no hop of the route served layer {layer}")


def _run(
    md: ModelDir, mesh: LocalMesh, fault: Callable[[list[TokenEvent]], None]
) -> list[TokenEvent]:
    async def go() -> list[TokenEvent]:
        # First and last only, whatever a sweep found: this measures skipping a middle node.
        remote = RemoteModel(
            md, mesh.addresses, topic_root=mesh.topic_root, never_skip=[0, md.num_layers - 1]
        )
        remote.tokenizer.eos_token_ids = frozenset()
        events: list[TokenEvent] = []
        async with remote:
            await remote.wait_ready(60)
            async for ev in remote.generate(_ids(md), SamplingParams(max_new_tokens=N)):
                events.append(ev)
                if len(events) == FAULT_AT:
                    fault(events)
        return events

    return asyncio.run(go())


def _figures(events: list[TokenEvent], intact: list[int], target: float) -> dict[str, Any]:
    before = [e.latency for e in events[1:FAULT_AT]]
    stall = max(e.latency for e in events[FAULT_AT:])
    got = [e.token_id for e in events]
    return {
        "stall_s": round(stall, 3),
        "target_stall_s": target,
        "normal_token_s": round(statistics.median(before), 4),
        "tokens": len(got),
        "lost": N - len(got),
        "identical_to_intact": got == intact,
        "skipped_after": sorted({i for e in events[FAULT_AT:] for i in e.skipped}),
    }


def run(md: ModelDir, models_dir: Path) -> dict[str, Any]:
    """Every failure kind, each on a fresh mesh; all processes stopped by pid."""
    local = LocalModel(md)
    local.tokenizer.eos_token_ids = frozenset()
    intact = [e.token_id for e in local.generate(_ids(md), SamplingParams(max_new_tokens=N))]
    del local
    six = [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 30)]
    replicas = [(0, 10), (10, 20), (10, 20), (20, 30)]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="jarvis-bench-") as tmp:

        def mesh(spans: list[tuple[int, int]]) -> LocalMesh:
            return LocalMesh(
                md.name, nodes=len(spans), spans=spans, brokers=2,
                run_dir=Path(tmp) / uuid.uuid4().hex[:6], models_dir=models_dir,
                topic_root=f"bench/{uuid.uuid4().hex[:8]}",
            )  # fmt: skip

        def node_kill(
            m: LocalMesh, layer: int, sig: signal.Signals, stopped: list[int]
        ) -> Callable[[list[TokenEvent]], None]:
            def fault(events: list[TokenEvent]) -> None:
                pid = m.node(_served(events[-1], layer)).pid
                stopped.append(pid)
                os.kill(pid, sig)

            return fault

        for name, spans, fault_kind in [
            ("node_sigkill", six, "kill"),
            ("node_sigkill_replica", replicas, "kill"),
            ("silent_cut", replicas, "stop"),
            ("broker_sigkill", replicas, "broker"),
        ]:
            m = mesh(spans).start()
            stopped: list[int] = []
            try:
                fault: Callable[[list[TokenEvent]], None]
                if fault_kind == "broker":

                    def fault(events: list[TokenEvent], m: LocalMesh = m) -> None:
                        m.brokers[0].kill()

                else:
                    sig = signal.SIGKILL if fault_kind == "kill" else signal.SIGSTOP
                    fault = node_kill(m, 10, sig, stopped)
                events = _run(md, m, fault)
                results[name] = _figures(events, intact, TARGETS[name])
            finally:
                for pid in stopped:  # a stopped process cannot act on SIGTERM
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
                m.stop()
    flat: dict[str, Any] = {}
    for name, figs in results.items():
        for k, v in figs.items():
            flat[f"{name}.{k}"] = v
    return flat
