"""Settings of one node agent process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jarvis_mqtt.brokers import BrokerAddress


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """Everything a node agent needs; CLI flags map onto these fields one to one."""

    node_id: str
    model: str
    start: int  # first layer hosted
    end: int  # one past the last layer hosted: the span is [start, end)
    brokers: tuple[BrokerAddress, ...]
    models_dir: Path | None = None  # None: $JARVIS_MODELS or ~/.cache/jarvis/models
    topic_root: str = "jarvis"
    dtype: str | None = None  # None: the dtype the model was imported in
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    kv_budget_bytes: int = 512 << 20  # KV memory for all sessions together
    max_seq_len: int = 2048  # tokens per session
    session_ttl: float = 600.0  # seconds idle before a session's cache is freed
    max_batch_tokens: int = 2048  # rows packed into one forward step
    # With several sessions active, wait for the others' next step, so that they share one
    # forward (one pass over the weights) instead of one forward each: at most as long as a
    # forward takes (waiting longer costs more than the forward it saves), and never more
    # than this.
    batch_wait: float = 0.05  # seconds; 0: never wait
    max_payload_bytes: int = 64 << 20  # larger messages are refused
    heartbeat: float = 0.5  # seconds between status refreshes; 3 missed = silently gone
    keepalive: int = 5  # MQTT keepalive, seconds; the broker sends the will after 1.5x
    graceful_timeout: float = 5.0  # seconds allowed for shutdown after SIGTERM
