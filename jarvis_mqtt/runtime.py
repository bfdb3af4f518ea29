"""The three pipeline stages: embedding, a span of decoder layers with its KV caches, the head.

Each stage loads only its own tensors from the model directory (memory-mapped safetensors,
hash-checked), on the meta device first so no memory is spent on weights it does not host.
What a stage keeps is copied out of the mapping (projections transposed, see `fuse`), one file
at a time, and no view of it survives: a mapping stays resident while any of its tensors lives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from jarvis_mqtt.errors import CacheMissError, SessionError
from jarvis_mqtt.heap import trim_heap
from jarvis_mqtt.hugepages import WeightArena, arena_bytes
from jarvis_mqtt.matmul import Alloc, transposed
from jarvis_mqtt.model import (
    DecoderLayer,
    LayerCache,
    ModelArgs,
    RMSNorm,
    Segment,
    matmul_t,
    positions_of,
)
from jarvis_mqtt.rope import RopeTable

if TYPE_CHECKING:
    from jarvis_mqtt.checkpoint import ModelDir

KV_CHUNK = 256  # positions: caches grow in multiples of this, doubling
DECODE_ROWS = 4  # a step of at most this many rows is decode-sized (GEMVs, not GEMMs)
DECODE_THREADS_STEPS = 6  # dry-run steps per thread count when measuring decode threads
DECODE_THREADS_MARGIN = 0.95  # 1 thread is kept only if at least 5 % faster

log = logging.getLogger(__name__)


def _owned(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy in `dtype` that owns its memory: not a view that would keep a file mapped."""
    return tensor.to(dtype, copy=True)


def _load_layer(layer: DecoderLayer, model_dir: ModelDir, dtype: torch.dtype, alloc: Alloc) -> None:
    """Load one layer's file into `layer` and fuse it; the file is unmapped on return.

    Projection weights go in as views of the mapping and `fuse` copies them, transposed and
    cast in one pass, into memory from `alloc`; the small tensors (norms, biases) are copied
    here.
    """
    tensors = model_dir.load_layer(layer.index)
    for name, tensor in tensors.items():
        if not name.endswith("_proj.weight"):
            tensors[name] = _owned(tensor, dtype)
    layer.load_state_dict(tensors, assign=True)
    del tensors
    layer.fuse(dtype, alloc)


class EmbedStage(nn.Module):
    """Token ids -> hidden states (Gemma scales by sqrt(hidden) in the model dtype)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # Built on the meta device and loaded; `_weight` skips the random init, which on meta
        # tensors would import torch's Python meta kernels (see `LayerSpan._build_ropes`).
        shape = (args.vocab_size, args.hidden_size)
        self.embed_tokens: nn.Embedding | None = nn.Embedding(*shape, _weight=torch.empty(shape))
        # With tied embeddings the head keeps the table transposed, (hidden, vocab), for fast
        # GEMVs; the embedding then gathers columns of that one copy instead of keeping two.
        self.table_t: torch.Tensor | None = None

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.table_t is not None:
            x = self.table_t.index_select(1, tokens).t().contiguous()
        else:
            assert self.embed_tokens is not None
            x = self.embed_tokens(tokens)
        if self.args.gemma:
            x = x * torch.tensor(self.args.hidden_size**0.5, dtype=x.dtype)
        return x


class HeadStage(nn.Module):
    """Final norm and LM head: hidden states -> logits (float32)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, 1.0 if args.gemma else 0.0)
        self.lm_head: nn.Linear | None = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.lm_head_t: torch.Tensor | None = None  # (hidden, vocab), set by load_client_stages

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.lm_head_t is not None, "load with load_client_stages"
        logits = matmul_t(self.norm(hidden), self.lm_head_t).float()
        cap = self.args.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def load_client_stages(
    model_dir: ModelDir, dtype: torch.dtype | None = None
) -> tuple[EmbedStage, HeadStage]:
    """Load the embedding and head stages (what a client holds) from `stage.safetensors`."""
    args = ModelArgs.from_config(model_dir.config)
    dtype = dtype or model_dir.dtype
    tensors = model_dir.load_stage()  # views of the mapped file: copy what is kept
    with torch.device("meta"):
        embed = EmbedStage(args)
        head = HeadStage(args)
    norm = {"norm.weight": _owned(tensors["norm.weight"], dtype)}
    head.load_state_dict(norm, assign=True, strict=False)
    head_w = tensors.get("lm_head.weight", tensors["embed_tokens.weight"])
    arena = WeightArena(arena_bytes([(head_w.shape, dtype)]))  # huge pages, see hugepages.py
    if "lm_head.weight" in tensors:
        head.lm_head_t = transposed(head_w, dtype=dtype, alloc=arena.empty)
        table = _owned(tensors["embed_tokens.weight"], dtype)
        embed.load_state_dict({"embed_tokens.weight": table}, assign=True)
    else:  # tied: one transposed table serves both stages
        head.lm_head_t = embed.table_t = transposed(head_w, dtype=dtype, alloc=arena.empty)
        embed.embed_tokens = None  # the meta placeholder is not needed
    head.lm_head = None
    return embed.eval(), head.eval()


@dataclass
class SessionState:
    """One session's KV caches for the layers of a span."""

    caches: list[LayerCache]
    last_used: float = 0.0  # time.monotonic() seconds
    # Positions filled, per layer. A message entering mid-span runs only the layers from its
    # entry on; the layers before it hold nothing for those positions until a replay fills them.
    filled: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.filled:
            self.filled = [0] * len(self.caches)

    @property
    def capacity(self) -> int:
        return self.caches[0].capacity if self.caches else 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)


class LayerSpan(nn.Module):
    """Decoder layers `[start, end)` and the KV caches of every session passing through them."""

    def __init__(
        self,
        args: ModelArgs,
        start: int,
        end: int,
        *,
        dtype: torch.dtype = torch.float32,
        max_seq_len: int = 4096,  # tokens per session
        kv_budget_bytes: int = 1 << 30,  # KV memory of all sessions together
        session_ttl: float = 600.0,  # seconds idle before a session is freed
    ) -> None:
        super().__init__()
        if not 0 <= start < end <= args.num_layers:
            raise ValueError(f"bad layer span [{start}, {end}) of {args.num_layers} layers")
        self.args, self.start, self.end = args, start, end
        self.dtype = dtype
        self.max_seq_len = min(max_seq_len, args.max_position_embeddings)
        self.kv_budget_bytes = kv_budget_bytes
        self.session_ttl = session_ttl
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(start, end))
        self.sessions: dict[str, SessionState] = {}
        self._decode_threads: dict[int, int] = {}  # torch threads -> threads for decode steps
        self._build_ropes()

    def _build_ropes(self) -> None:
        # Real CPU tensors even when the span is built on the meta device: computing on meta
        # tensors would import torch's Python meta kernels (sympy and ~800 modules, ~67 MiB).
        with torch.device("cpu"):
            self._build_rope_tables()

    def _build_rope_tables(self) -> None:
        a = self.args
        self._rope_global = RopeTable.build(
            a, a.rope_theta, self.max_seq_len, self.dtype, scaled=True
        )
        self._rope_local = self._rope_global
        if a.rope_local_theta is not None:
            self._rope_local = RopeTable.build(
                a, a.rope_local_theta, self.max_seq_len, self.dtype, scaled=False
            )

    @classmethod
    def load(
        cls,
        model_dir: ModelDir,
        start: int,
        end: int,
        *,
        dtype: torch.dtype | None = None,
        **kwargs: float | int,
    ) -> LayerSpan:
        """Build on the meta device, then load only the shards of layers `[start, end)`."""
        args = ModelArgs.from_config(model_dir.config)
        dtype = dtype or model_dir.dtype
        with torch.device("meta"):
            span = cls(args, start, end, dtype=dtype, **kwargs)  # type: ignore[arg-type]
        # Every fused matrix of the span in one mapping on huge pages, see hugepages.py.
        shapes = DecoderLayer.fused_shapes(args) * (end - start)
        arena = WeightArena(arena_bytes([(shape, dtype) for shape in shapes]))
        for layer in span.layers:  # layer by layer: one file mapped at a time
            assert isinstance(layer, DecoderLayer)
            _load_layer(layer, model_dir, dtype, arena.empty)
        trim_heap()  # what loading freed (norms cast, heads reordered): 8 MiB for 30 layers
        return span.eval()

    def fuse(self) -> None:
        """Fuse projections after weights are in place (`load` does it as it goes)."""
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            layer.fuse(self.dtype)

    # -- sessions ------------------------------------------------------------------------------

    @property
    def kv_bytes(self) -> int:
        """KV memory held by all sessions."""
        return sum(s.nbytes for s in self.sessions.values())

    def free(self, session: str) -> bool:
        """Drop a session's caches; True if it existed."""
        return self.sessions.pop(session, None) is not None

    def expire(self, now: float | None = None) -> list[str]:
        """Free sessions idle longer than the TTL; return their ids."""
        now = time.monotonic() if now is None else now
        old = [sid for sid, s in self.sessions.items() if now - s.last_used > self.session_ttl]
        for sid in old:
            del self.sessions[sid]
        return old

    def _cache_bytes(self, capacity: int) -> int:
        a = self.args
        per_layer = 2 * a.num_kv_heads * capacity * a.head_dim * self.dtype.itemsize
        return per_layer * (self.end - self.start)

    def _reserve(self, segments: Sequence[Segment], run: Sequence[int]) -> list[SessionState]:
        """Validate positions and grow caches before any compute, so a failure changes nothing.

        `run`: the indices (in this span) of the layers that will run.
        """
        plans: list[tuple[Segment, SessionState | None, int]] = []
        extra = 0
        for seg in segments:
            end = seg.start + seg.length
            if seg.length < 1 or seg.start < 0:
                raise SessionError(f"session {seg.session}: empty or negative segment")
            if end > self.max_seq_len:
                raise SessionError(
                    f"session {seg.session}: context full ({end} > {self.max_seq_len} tokens)"
                )
            state = self.sessions.get(seg.session)
            if state is None and seg.start != 0:
                raise CacheMissError(
                    f"unknown session {seg.session} (position {seg.start})",
                    session=seg.session,
                    have=0,
                )
            cached = min(state.filled[j] for j in run) if state and run else seg.start
            if seg.start > cached:
                raise CacheMissError(
                    f"session {seg.session}: position {seg.start} skips ahead of the "
                    f"{cached} cached in layers {self.start + run[0]}-{self.start + run[-1]}",
                    session=seg.session,
                    have=cached,
                )
            have = state.capacity if state else 0
            new_cap = have
            if end > have:
                new_cap = min(self.max_seq_len, max(2 * have, -(-end // KV_CHUNK) * KV_CHUNK))
            extra += self._cache_bytes(new_cap) - self._cache_bytes(have)
            plans.append((seg, state, new_cap))
        if extra > 0 and self.kv_bytes + extra > self.kv_budget_bytes:
            raise SessionError(
                f"KV memory full: {self.kv_bytes + extra} bytes needed, budget "
                f"{self.kv_budget_bytes}; retry later or free sessions"
            )
        states = []
        now = time.monotonic()
        a = self.args
        for seg, state, new_cap in plans:
            if state is None:
                state = SessionState(
                    caches=[
                        LayerCache.zeros(a.num_kv_heads, new_cap, a.head_dim, self.dtype)
                        for _ in range(self.end - self.start)
                    ]
                )
                self.sessions[seg.session] = state
            elif new_cap > state.capacity:
                for cache in state.caches:
                    cache.grow(new_cap)
            for j in run:
                state.filled[j] = seg.start + seg.length
            state.last_used = now
            states.append(state)
        return states

    # -- compute -------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self, x: torch.Tensor, segments: Sequence[Segment], skip: Iterable[int] = ()
    ) -> torch.Tensor:
        """Run packed hidden states `(N, hidden)` through the span; layers in `skip` are bypassed.

        Skipped layers keep no cache for this step (the JARVIS layer-skip behaviour). Decode-
        sized steps run on the thread count `decode_threads` measured fastest for this span.
        """
        threads = torch.get_num_threads()
        if threads == 1 or x.shape[0] > DECODE_ROWS:
            return self._forward(x, segments, skip)
        best = self.decode_threads()
        if best == threads:
            return self._forward(x, segments, skip)
        torch.set_num_threads(best)
        try:
            return self._forward(x, segments, skip)
        finally:
            torch.set_num_threads(threads)

    def decode_threads(self) -> int:
        """The torch threads decode-sized steps of this span run on at the current thread
        count; measured on the first call at each count (see `_measure_decode_threads`),
        which a node makes right after loading, so that no request waits for it."""
        threads = torch.get_num_threads()
        if threads == 1:
            return 1
        best = self._decode_threads.get(threads)
        if best is None:
            best = self._decode_threads[threads] = self._measure_decode_threads(threads)
        return best

    def _measure_decode_threads(self, threads: int) -> int:
        """1 or `threads`, whichever ran a one-row step of this span faster (best of a few
        dry-run steps each, interleaved, on a scratch session freed after).

        A decode step is a chain of GEMVs and small ops. Where threads are cheap to wake (a
        Raspberry Pi's cores) splitting the GEMVs over them pays; on a small VM each parallel
        region can cost more than it saves, and the idle thread slows the small ops between
        them: 1 thread took 33 ms a token for SmolLM2's 30 layers here, 2 threads 42 ms."""
        sid = "\x00decode-threads"
        x = torch.zeros(1, self.args.hidden_size, dtype=self.dtype)
        best = dict.fromkeys((1, threads), float("inf"))
        try:
            for pos in range(DECODE_THREADS_STEPS):
                for n in best:
                    torch.set_num_threads(n)
                    t0 = time.perf_counter()
                    self._forward(x, [Segment(sid, pos, 1)], ())
                    best[n] = min(best[n], time.perf_counter() - t0)
        except SessionError as e:  # no KV memory to spare now: keep the threads as they are
            log.info("layers [%d, %d): decode threads not measured: %s", self.start, self.end, e)
            return threads
        finally:
            torch.set_num_threads(threads)
            self.free(sid)
        pick = 1 if best[1] < DECODE_THREADS_MARGIN * best[threads] else threads
        log.info(
            "layers [%d, %d): decode steps on %d thread(s): %.2f ms on 1, %.2f ms on %d",
            self.start, self.end, pick, best[1] * 1e3, best[threads] * 1e3, threads,
        )  # fmt: skip
        return pick

    def _forward(
        self, x: torch.Tensor, segments: Sequence[Segment], skip: Iterable[int]
    ) -> torch.Tensor:
        if x.shape[0] != sum(s.length for s in segments):
            raise SessionError(
                f"{x.shape[0]} rows but segments cover {sum(s.length for s in segments)}"
            )
        if len({s.session for s in segments}) != len(segments):
            raise SessionError("a session appears twice in one batch")
        skip = set(skip)
        run = [j for j, layer in enumerate(self.layers) if self.start + j not in skip]
        states = self._reserve(segments, run)
        positions = positions_of(segments)
        # RoPE angles looked up once for all layers (Gemma 3's sliding layers have their own).
        global_rope = self._rope_global.at(positions)
        local_rope = (
            global_rope if self._rope_local is self._rope_global else self._rope_local.at(positions)
        )
        x = x.to(self.dtype)
        one = x.shape[0] == 1  # one session's decode step
        for j, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)
            if layer.index in skip:
                continue
            rope = local_rope if layer.sliding else global_rope
            if one and layer.one_row:
                x = layer.forward_one(x, rope, segments[0].start, states[0].caches[j])
            else:  # `forward`, not `__call__`: no hooks to look for
                x = layer.forward(x, rope, segments, [s.caches[j] for s in states])
        return x
