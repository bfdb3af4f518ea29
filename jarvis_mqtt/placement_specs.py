"""What the planner plans over: a model's layers and the nodes offering memory and speed.

A `ModelSpec` gives each decoder layer its bytes (from the manifest), its compute cost (uniform
unless measured) and says which layers are critical. A `NodeSpec` gives a device's free memory
and how fast it runs a layer. Both are plain frozen data; `placement.plan` is pure over them.

Capacity keys a contributor announces in its `NodeStatus.capacity` (`jarvis node --contribute`
sets them in `node_agent.contributor.measure_capacity`):

| key              | type  | meaning                                                              |
| ---------------- | ----- | -------------------------------------------------------------------- |
| `memory_bytes`   | int   | required: memory free for layers, KV cache and the agent itself       |
| `cores`          | int   | CPU cores (default 1); speed estimate when nothing is measured        |
| `sec_per_layer`  | float | measured: median seconds of one decode step through one layer        |
| `bench_model`    | str   | the model `sec_per_layer` was measured on                             |

Others (`threads`, `kv_budget_bytes`, ...) are ignored by the planner.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jarvis_mqtt.errors import CheckpointError, ConfigError, JarvisError

if TYPE_CHECKING:
    from jarvis_mqtt.checkpoint import ModelDir
    from jarvis_mqtt.membership import NodeStatus

CRITICALITY_FILE = "criticality.json"
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlacementError(JarvisError):
    """The model does not fit on the nodes; `missing_bytes` says by how much."""

    def __init__(self, text: str, *, missing_bytes: int = 0) -> None:
        super().__init__(text)
        self.missing_bytes = missing_bytes


def fmt_bytes(n: float) -> str:
    """`1.5 GiB`-style text for a byte count."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A model as the planner sees it: per-layer bytes and cost, and its critical layers."""

    name: str
    layer_bytes: tuple[int, ...]  # bytes of each decoder layer's weights
    layer_cost: tuple[float, ...]  # compute of each layer, in units of a node's sec_per_layer
    critical: frozenset[int] = frozenset()  # layers whose extra copies come before all others
    importance: tuple[float, ...] = ()  # per layer, higher = copied earlier; () = all equal
    kv_bytes_per_token: int = 0  # KV cache bytes per token per layer

    def __post_init__(self) -> None:
        n = len(self.layer_bytes)
        if n == 0:
            raise ConfigError(f"{self.name}: a model needs at least one layer")
        if len(self.layer_cost) != n or (self.importance and len(self.importance) != n):
            raise ConfigError(f"{self.name}: per-layer lists of different lengths")
        if any(b < 0 for b in self.layer_bytes) or self.kv_bytes_per_token < 0:
            raise ConfigError(f"{self.name}: negative bytes")
        if any(not (c > 0 and math.isfinite(c)) for c in self.layer_cost):
            raise ConfigError(f"{self.name}: layer costs must be positive and finite")
        bad = sorted(i for i in self.critical if not 0 <= i < n)
        if bad:
            raise ConfigError(f"{self.name}: critical layers {bad} outside [0, {n})")

    @property
    def num_layers(self) -> int:
        """Decoder layers in the model."""
        return len(self.layer_bytes)

    @property
    def total_bytes(self) -> int:
        """Bytes of all decoder layers (the client holds embedding and head)."""
        return sum(self.layer_bytes)

    def priority(self, critical: Collection[int] = ()) -> list[int]:
        """Layers in the order their extra copies are placed: critical ones first.

        Within each group: higher importance first, then lower index.
        """
        crit = self.critical | set(critical)
        imp = self.importance or (0.0,) * self.num_layers
        return sorted(range(self.num_layers), key=lambda i: (i not in crit, -imp[i], i))

    @classmethod
    def uniform(
        cls,
        name: str,
        num_layers: int,
        layer_bytes: int,
        *,
        critical: Iterable[int] | None = None,
        kv_bytes_per_token: int = 0,
    ) -> ModelSpec:
        """Identical layers of cost 1; critical defaults to the first and last."""
        crit = {0, num_layers - 1} if critical is None else set(critical)
        return cls(
            name=name,
            layer_bytes=(layer_bytes,) * num_layers,
            layer_cost=(1.0,) * num_layers,
            critical=frozenset(crit),
            kv_bytes_per_token=kv_bytes_per_token,
        )

    @classmethod
    def from_model_dir(
        cls,
        md: ModelDir,
        critical: Iterable[int] | None = None,
        *,
        cost: Sequence[float] | None = None,
    ) -> ModelSpec:
        """Bytes from the manifest; cost uniform unless given (a measured per-layer profile).

        Critical layers: `critical` when given, else `never_skip` of `criticality.json` in the
        model directory, else the first and the last layer (the JARVIS poster found those
        critical). That file's per-layer `kl` (else `acc_drop`) orders the extra copies.
        """
        n = md.num_layers
        layer_bytes = tuple(md.shard_bytes(i, i + 1, include_stage=False) for i in range(n))
        never_skip, importance = read_criticality(md.path / CRITICALITY_FILE, n)
        if critical is not None:
            crit = frozenset(critical)
        elif never_skip is not None:
            crit = never_skip
        else:
            crit = frozenset({0, n - 1})
        config = md.config
        heads = int(config.get("num_attention_heads", 1))
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config.get("hidden_size", 0)) // heads)
        itemsize = _ITEMSIZE.get(str(md.manifest.get("dtype")), 4)
        return cls(
            name=md.name,
            layer_bytes=layer_bytes,
            layer_cost=tuple(float(c) for c in cost) if cost is not None else (1.0,) * n,
            critical=crit,
            importance=importance,
            kv_bytes_per_token=2 * kv_heads * head_dim * itemsize,  # keys and values
        )


def read_criticality(
    path: Path, num_layers: int
) -> tuple[frozenset[int] | None, tuple[float, ...]]:
    """`never_skip` (None when absent) and per-layer importance from a `criticality.json`.

    The file is `{"never_skip": [...], "layers": {"i": {"acc_drop": ..., "kl": ...}}}`;
    importance is `kl` when any layer has one, else `acc_drop`, else empty. No file: (None, ()).
    """
    if not path.is_file():
        return None, ()
    where = f"{path.name} in {path.parent}"
    never_skip: frozenset[int] | None = None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        if "never_skip" in data:
            never_skip = frozenset(int(i) for i in data["never_skip"])
        layers = {int(k): dict(v) for k, v in dict(data.get("layers") or {}).items()}
        scores: dict[str, dict[int, float]] = {"kl": {}, "acc_drop": {}}
        for i, row in layers.items():
            for key, got in scores.items():
                if row.get(key) is not None:
                    got[i] = float(row[key])
    except (OSError, UnicodeDecodeError, TypeError, ValueError) as e:  # JSONDecodeError too
        raise CheckpointError(f"{where}: unreadable: {e}") from e
    bad = sorted(i for i in (never_skip or set()) | set(layers) if not 0 <= i < num_layers)
    if bad:
        raise CheckpointError(f"{where}: layers {bad} outside [0, {num_layers})")
    chosen = scores["kl"] or scores["acc_drop"]
    importance = tuple(chosen.get(i, 0.0) for i in range(num_layers)) if chosen else ()
    return never_skip, importance


@dataclass(frozen=True, kw_only=True)
class NodeSpec:
    """A device offering memory and compute for layers."""

    node_id: str
    memory_bytes: int  # free memory for layers, KV cache and the agent's own overhead
    sec_per_layer: float  # seconds per token through one layer of cost 1.0 on this node
    cores: int = 1  # informational (and the speed estimate when nothing was measured)
    measured: bool = True  # sec_per_layer was measured, not estimated from cores
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)  # other capacity keys

    def __post_init__(self) -> None:
        if self.memory_bytes < 0:
            raise ConfigError(f"node {self.node_id}: negative memory")
        if not (self.sec_per_layer > 0 and math.isfinite(self.sec_per_layer)):
            raise ConfigError(f"node {self.node_id}: sec_per_layer must be positive and finite")

    @property
    def speed(self) -> float:
        """Layers of cost 1.0 per second."""
        return 1.0 / self.sec_per_layer

    @classmethod
    def with_speed(cls, node_id: str, memory_bytes: int, speed: float, cores: int = 1) -> NodeSpec:
        """A node of relative `speed` (layers per second; e.g. its core count)."""
        if not speed > 0:
            raise ConfigError(f"node {node_id}: speed must be positive")
        return cls(node_id=node_id, memory_bytes=memory_bytes, sec_per_layer=1.0 / speed,
                   cores=cores, measured=False)  # fmt: skip

    @classmethod
    def from_capacity(
        cls,
        node_id: str,
        capacity: Mapping[str, Any],
        *,
        core_sec_per_layer: float = 1.0,
        bench_scale: Mapping[str, float] | None = None,
    ) -> NodeSpec:
        """A node from announced capacity keys (see the module docstring).

        Speed: the measured `sec_per_layer`, times `bench_scale[bench_model]` when it was
        measured on another model; else `core_sec_per_layer / cores` (an estimate).
        """
        try:
            memory = int(capacity["memory_bytes"])
            cores = max(1, int(capacity.get("cores") or 1))
            sec = capacity.get("sec_per_layer")
            sec = float(sec) if sec is not None else None
        except KeyError:
            raise ConfigError(f"node {node_id}: capacity has no memory_bytes") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"node {node_id}: bad capacity: {e}") from e
        known = {"memory_bytes", "cores", "sec_per_layer"}
        extra = {k: v for k, v in capacity.items() if k not in known}
        if sec is not None and sec > 0 and math.isfinite(sec):
            sec *= (bench_scale or {}).get(str(capacity.get("bench_model", "")), 1.0)
            return cls(node_id=node_id, memory_bytes=memory, sec_per_layer=sec, cores=cores,
                       measured=True, extra=extra)  # fmt: skip
        return cls(node_id=node_id, memory_bytes=memory, sec_per_layer=core_sec_per_layer / cores,
                   cores=cores, measured=False, extra=extra)  # fmt: skip

    @classmethod
    def from_status(
        cls,
        status: NodeStatus,
        *,
        core_sec_per_layer: float = 1.0,
        bench_scale: Mapping[str, float] | None = None,
    ) -> NodeSpec:
        """A node from its announced status (a contributor's idle status carries capacity)."""
        return cls.from_capacity(
            status.node_id,
            status.capacity,
            core_sec_per_layer=core_sec_per_layer,
            bench_scale=bench_scale,
        )


def core_seconds(capacities: Iterable[Mapping[str, Any]]) -> float:
    """Seconds per layer of one core, from the nodes that measured: median of sec × cores.

    Lets nodes that measured nothing be estimated in the same unit as those that did; 1.0 when
    none measured (speeds are then relative: proportional to cores).
    """
    samples = []
    for cap in capacities:
        try:
            sec, cores = float(cap["sec_per_layer"]), max(1, int(cap.get("cores") or 1))
        except (KeyError, TypeError, ValueError):
            continue
        if sec > 0 and math.isfinite(sec):
            samples.append(sec * cores)
    return statistics.median(samples) if samples else 1.0
