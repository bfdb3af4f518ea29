"""`jarvis node`: run one node agent until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

from jarvis_mqtt.brokers import parse_brokers
from jarvis_mqtt.errors import ConfigError
from node_agent.config import NodeConfig


def add_node_flags(p: argparse.ArgumentParser) -> None:
    """Flags of `jarvis node`, one per NodeConfig field that users set."""
    p.add_argument("--model", help="model name (as imported)")
    p.add_argument("--layers", help="half-open span START:END, e.g. 0:5")
    p.add_argument(
        "--contribute",
        action="store_true",
        help="offer this device's capacity and host what `jarvis plan --apply` assigns",
    )
    p.add_argument(
        "--bench-model", help="with --contribute: measure seconds per layer of this model"
    )
    p.add_argument("--broker", required=True, help="HOST:PORT[,HOST:PORT...] of every broker")
    p.add_argument("--node-id", required=True)
    p.add_argument("--topic-root", default="jarvis")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--kv-budget-mb", type=int, default=512, help="KV memory for all sessions")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--session-ttl", type=float, default=600.0, help="seconds idle")
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument(
        "--batch-wait-ms", type=float, default=50.0,
        help="with several sessions active, wait at most this long (and at most one forward's "
        "time) for them to share a forward step",
    )  # fmt: skip
    p.add_argument("--max-payload-mb", type=int, default=64)
    p.add_argument("--heartbeat", type=float, default=0.5, help="seconds")
    p.add_argument("--keepalive", type=int, default=5, help="MQTT keepalive seconds")
    from jarvis_mqtt.cli import add_auth_flags

    add_auth_flags(p)


def config_from_args(a: argparse.Namespace) -> NodeConfig:
    """NodeConfig from parsed flags."""
    if a.contribute:
        start = end = 0
    elif not (a.model and a.layers):
        raise ConfigError("give --model and --layers, or --contribute")
    else:
        try:
            start_s, end_s = a.layers.split(":")
            start, end = int(start_s), int(end_s)
        except ValueError:
            raise ConfigError(f"--layers {a.layers!r} is not START:END") from None
    return NodeConfig(
        node_id=a.node_id,
        model=a.model or "",
        start=start,
        end=end,
        brokers=tuple(parse_brokers(a.broker)),
        models_dir=Path(a.models_dir) if getattr(a, "models_dir", None) else None,
        topic_root=a.topic_root,
        dtype=a.dtype,
        threads=a.threads,
        kv_budget_bytes=a.kv_budget_mb << 20,
        max_seq_len=a.max_seq_len,
        session_ttl=a.session_ttl,
        max_batch_tokens=a.max_batch_tokens,
        batch_wait=a.batch_wait_ms / 1e3,
        max_payload_bytes=a.max_payload_mb << 20,
        heartbeat=a.heartbeat,
        keepalive=a.keepalive,
    )


async def serve(cfg: NodeConfig, contribute: bool = False, bench_model: str | None = None) -> None:
    """Run the agent (or a contributor); SIGTERM and SIGINT start a clean shutdown."""
    # torch comes with these: not needed for --help
    from node_agent.agent import NodeAgent
    from node_agent.contributor import Contributor

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if contribute:
        await Contributor(cfg, bench_model=bench_model, stop=stop).run()
    else:
        await NodeAgent(cfg, stop=stop).run()


def run_node(a: argparse.Namespace) -> int:
    """Entry point used by `jarvis node`."""
    import torch

    from jarvis_mqtt.cli import apply_auth_flags

    cfg = config_from_args(a)
    if a.username and a.username != cfg.node_id and not a.contribute:
        raise ConfigError(f"--username {a.username!r} must equal --node-id {cfg.node_id!r}")
    apply_auth_flags(a)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    asyncio.run(serve(cfg, a.contribute, a.bench_model))
    # The node has left the mesh cleanly; skip the interpreter's slow teardown of torch and
    # its thread pools (1.5 s here, more on a Pi) so restarts and `mesh down` are quick.
    logging.shutdown()
    os._exit(0)
