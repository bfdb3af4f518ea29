"""Decoder-only transformer runtime, split the way the pipeline needs it.

Three stages: `EmbedStage` (tokens -> hidden), `LayerSpan` (decoder layers `[start, end)`, each
with its own KV cache per session) and `HeadStage` (final norm + LM head -> logits). Chaining
all three in one process is the single-process reference; a node agent runs one `LayerSpan`.

Families: Llama (SmolLM2, TinyLlama, Llama 2/3), Qwen2 (QKV bias), Gemma 1 (GeGLU, scaled
embeddings, RMSNorm with 1+w) and Gemma 3 (QK-norm, sandwich norms, sliding-window layers with
their own RoPE base). Parameter names follow Hugging Face so shards load without renaming.

A forward step takes a *packed* batch: the tokens of several sessions concatenated along one
axis, `(N, hidden)`, with a list of `Segment`s saying which rows belong to which session and at
which positions. Linear layers run once over all rows; attention runs per segment against that
session's cache. Prefill and decode are the same call (a decode segment has length 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from jarvis_mqtt.errors import ConfigError
from jarvis_mqtt.matmul import Alloc, matmul_t, torch_empty, transposed
from jarvis_mqtt.rope import pair_order

if TYPE_CHECKING:
    from jarvis_mqtt.rope import RopeAngles

FAMILIES = ("llama", "qwen2", "gemma", "gemma3")
GEMMA_FAMILIES = ("gemma", "gemma3")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_from_name(name: str) -> torch.dtype:
    """Map "float32" / "bfloat16" / "float16" to a torch dtype, with a clear error otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """Inverse of `dtype_from_name`."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ConfigError(f"unsupported dtype {dtype}")


def _rope_theta(config: Mapping[str, Any], layer_type: str | None = None) -> float | None:
    """RoPE base from either the transformers<5 keys or the >=5 `rope_parameters` dict."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping):
        if layer_type is not None and isinstance(params.get(layer_type), Mapping):
            return float(params[layer_type]["rope_theta"])
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return None


def _rope_scaling(
    config: Mapping[str, Any], layer_type: str | None = None
) -> tuple[tuple[str, Any], ...] | None:
    scaling = config.get("rope_scaling")
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and isinstance(params.get(layer_type), Mapping):
        params = params[layer_type]  # Gemma 3 on transformers 5: per layer type
    if scaling is None and isinstance(params, Mapping) and "rope_type" in params:
        scaling = params
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise ConfigError(f"unsupported rope scaling {kind!r}")
    items = [(k, v) for k, v in scaling.items() if k not in ("type", "rope_type")]
    return tuple(sorted([*items, ("rope_type", kind)]))


@dataclass(frozen=True, kw_only=True)
class ModelArgs:
    """Architecture hyper-parameters, read from a Hugging Face style `config.json`."""

    family: str  # one of FAMILIES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float  # RoPE base of full-attention layers
    rope_local_theta: float | None = None  # Gemma 3: RoPE base of sliding-window layers
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of the scaling dict
    max_position_embeddings: int = 4096  # tokens
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Qwen2 has biases on q/k/v
    hidden_act: str = "silu"  # "silu" or "gelu_pytorch_tanh"
    sliding_window: int | None = None  # tokens a sliding layer looks back, itself included
    layer_types: tuple[str, ...] = ()  # per layer: "full_attention" | "sliding_attention"
    query_pre_attn_scalar: float | None = None  # Gemma: attention scale is this ** -0.5
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelArgs:
        """Build from a config dict; a `text_config` inside a multimodal config is used."""
        if isinstance(config.get("text_config"), Mapping):
            config = {**config["text_config"], "model_type": config.get("model_type")}
        family = str(config.get("model_type", ""))
        if family in ("gemma3_text",):
            family = "gemma3"
        if family not in FAMILIES:
            raise ConfigError(
                f"unknown model family {family!r}: supported are {', '.join(FAMILIES)}"
            )
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        gemma = family in GEMMA_FAMILIES
        act = config.get("hidden_activation") or config.get("hidden_act") or "silu"
        if gemma and act == "gelu":
            act = "gelu_pytorch_tanh"  # Gemma checkpoints say "gelu" but were trained with tanh
        layer_types: tuple[str, ...] = ()
        sliding = config.get("sliding_window") if family == "gemma3" else None
        if family == "gemma3":
            layer_types = tuple(config.get("layer_types") or ())
            if not layer_types:
                pattern = int(config.get("sliding_window_pattern", 6))
                layer_types = tuple(
                    "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                    for i in range(layers)
                )
        theta = _rope_theta(config, "full_attention") or config.get("rope_theta") or 10000.0
        local = None
        if family == "gemma3":
            local = (
                _rope_theta(config, "sliding_attention")
                or config.get("rope_local_base_freq")
                or 10000.0
            )
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            family=family,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_local_theta=None if local is None else float(local),
            # Gemma 3 (4B and up) scales only its global layers; the sliding ones never are.
            rope_scaling=_rope_scaling(config, "full_attention"),
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", gemma)),
            attention_bias=bool(config.get("attention_bias", family == "qwen2")),
            hidden_act=str(act),
            sliding_window=None if sliding is None else int(sliding),
            layer_types=layer_types,
            query_pre_attn_scalar=(
                float(config.get("query_pre_attn_scalar") or head_dim) if gemma else None
            ),
            final_logit_softcapping=config.get("final_logit_softcapping"),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @property
    def gemma(self) -> bool:
        """Gemma conventions: RMSNorm scales by (1 + w), embeddings scaled by sqrt(hidden)."""
        return self.family in GEMMA_FAMILIES

    @property
    def attn_scale(self) -> float:
        """Softmax scale of attention scores."""
        if self.query_pre_attn_scalar is not None:
            return self.query_pre_attn_scalar**-0.5
        return self.head_dim**-0.5

    def is_sliding(self, layer: int) -> bool:
        """Whether decoder layer `layer` attends through a sliding window."""
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"


def _release(*linears: nn.Linear) -> None:
    """Drop the loaded weights of projections that `fuse()` has copied (they are not used).

    Loaded weights may be views of a memory-mapped file: the last reference dropped unmaps it,
    and with it the file pages the copy read, which the process would otherwise keep resident.
    """
    for proj in linears:
        proj.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        proj.register_parameter("bias", None)


class RMSNorm(nn.Module):
    """Root-mean-square norm in float32; Gemma scales by (1 + w), the others by w."""

    def __init__(self, dim: int, eps: float, offset: float) -> None:
        super().__init__()
        self.eps = eps
        self._eps = torch.tensor(eps, device="cpu")  # not on the meta device spans build on
        self.offset = offset
        self.weight = nn.Parameter(torch.empty(dim))
        self.folded = False  # set by `fold`: the scale lives in the next projection

    def fold(self) -> torch.Tensor:
        """Hand this norm's scale to the projection that reads its output: returns the factor
        by which to scale that projection's input rows, and leaves only the normalisation here.

        `x * rsqrt(mean(x²) + eps) * (offset + w)` = `x / hypot(|x|, sqrt(d eps)) * sqrt(d)
        (offset + w)`: three ops where there were eight (`mean` divides, `add` wraps its
        scalar), which on a CPU whose caches each weight matrix has just swept cost more than
        their arithmetic (0.5 ms of 34 per token here, 30 layers)."""
        dim = self.weight.shape[0]
        self.folded = True
        self._root_dim_eps = torch.tensor((dim * self.eps) ** 0.5, device="cpu")
        return (self.offset + self.weight.double()) * dim**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            return x / torch.hypot(norm, self._root_dim_eps)
        if x.dtype == torch.float32:  # the default: the same math in fewer dispatched ops
            # A 0-d tensor eps and x * x, not `+ 1e-6` and pow(2): Python scalars are wrapped
            # into tensors by a copy on every call, which costs more than the math here.
            x = x * torch.rsqrt((x * x).mean(-1, keepdim=True).add_(self._eps))
            return x * (self.offset + self.weight) if self.offset else self.weight * x
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + self.weight.float())).type_as(x)
        # Llama casts back before scaling; keep that order so bf16 matches bit for bit.
        return self.weight * xf.type_as(x)


@dataclass(frozen=True)
class Segment:
    """Rows of a packed batch that belong to one session: `length` tokens from `start`."""

    session: str
    start: int  # position of the first token of this segment in its session
    length: int


@dataclass
class LayerCache:
    """Keys and values of one layer for one session in one tensor, `(2, kv_heads, capacity,
    head_dim)`, so that one copy stores a step's keys and values; `k` and `v` view it."""

    kv: torch.Tensor
    k: torch.Tensor = field(init=False, repr=False)
    v: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.k, self.v = self.kv[0], self.kv[1]

    @classmethod
    def zeros(cls, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype) -> LayerCache:
        return cls(torch.zeros(2, kv_heads, capacity, head_dim, dtype=dtype))

    @property
    def capacity(self) -> int:
        return self.kv.shape[2]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def grow(self, new_cap: int) -> None:
        """Reallocate to hold `new_cap` positions, keeping what is cached."""
        old = self.kv
        self.kv = old.new_zeros(2, old.shape[1], new_cap, old.shape[3])
        self.kv[:, :, : old.shape[2]] = old
        self.__post_init__()


class Attention(nn.Module):
    """Grouped-query attention with an optional QK-norm (Gemma 3)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        hd, h, kv = args.head_dim, args.num_heads, args.num_kv_heads
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, h * hd, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, kv * hd, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, kv * hd, bias=bias)
        self.o_proj = nn.Linear(h * hd, args.hidden_size, bias=False)
        if args.family == "gemma3":
            self.q_norm: RMSNorm | None = RMSNorm(hd, args.rms_norm_eps, 1.0)
            self.k_norm: RMSNorm | None = RMSNorm(hd, args.rms_norm_eps, 1.0)
        else:
            self.q_norm = self.k_norm = None
        # 0-d: no per-call wrapping; None once `fold_scale` moved it into the q projection.
        self._scale: torch.Tensor | None = torch.tensor(args.attn_scale, device="cpu")
        # Filled by `fuse()` after loading: q, k and v in one (in, out) matrix, see `matmul_t`.
        self.qkv_t: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None
        self.o_t: torch.Tensor | None = None
        # Set by `fuse()`: q and k columns stored in pairs, rotated by one complex product
        # (float32 without QK-norm; see `rope.pair_order`).
        self.pairs = False

    @staticmethod
    def fused_shapes(args: ModelArgs) -> list[tuple[int, int]]:
        """Shapes of the matrices `fuse` makes: qkv and o, `(in, out)`."""
        hd, h, kv = args.head_dim, args.num_heads, args.num_kv_heads
        return [(args.hidden_size, (h + 2 * kv) * hd), (h * hd, args.hidden_size)]

    def fuse(self, dtype: torch.dtype | None = None, alloc: Alloc = torch_empty) -> None:
        """Replace the loaded projections by transposed, fused copies (fewer, faster GEMVs),
        cast to `dtype` (default: the loaded one) in the same copy, made by `alloc`."""
        q, k, v = self.q_proj, self.k_proj, self.v_proj
        self.qkv_t = transposed(q.weight, k.weight, v.weight, dtype=dtype, alloc=alloc)
        if self.args.attention_bias:
            with torch.no_grad():  # no graph holding the loaded biases, see `transposed`
                self.qkv_bias = torch.cat([q.bias, k.bias, v.bias]).to(self.qkv_t.dtype)
        self.o_t = transposed(self.o_proj.weight, dtype=dtype, alloc=alloc)
        _release(self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        self.pairs = self.qkv_t.dtype == torch.float32 and self.q_norm is None
        if self.pairs:
            heads = self.args.num_heads + self.args.num_kv_heads  # q and k
            qk_cols = heads * self.args.head_dim
            pair_order(self.qkv_t[:, :qk_cols], heads)
            if self.qkv_bias is not None:
                pair_order(self.qkv_bias[:qk_cols], heads)

    def fold_scale(self) -> None:
        """Scale the q columns (and bias) of the fused projection by the softmax scale, so
        that attention need not scale its scores."""
        assert self.qkv_t is not None
        q_cols = self.args.num_heads * self.args.head_dim
        with torch.no_grad():
            self.qkv_t[:, :q_cols].mul_(self.args.attn_scale)
            if self.qkv_bias is not None:
                self.qkv_bias[:q_cols].mul_(self.args.attn_scale)
        self._scale = None

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeAngles,
        segments: Sequence[Segment],
        caches: Sequence[LayerCache],
        window: int | None,
    ) -> torch.Tensor:
        n = x.shape[0]
        a = self.args
        hd, h, kv = a.head_dim, a.num_heads, a.num_kv_heads
        assert self.qkv_t is not None and self.o_t is not None, "call fuse() after loading"
        qkv = matmul_t(x, self.qkv_t)  # (N, (h + 2 kv) hd)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        heads = qkv.view(n, h + 2 * kv, hd)
        if self.pairs:  # q and k rotated in place: keys and values stay side by side
            rope.rotate_pairs_(heads[:, : h + kv])
            q, new_kv = heads[:, :h], heads[:, h:].view(n, 2, kv, hd)
        elif self.q_norm is not None and self.k_norm is not None:
            q = rope.apply(self.q_norm.forward(heads[:, :h]))
            k = rope.apply(self.k_norm.forward(heads[:, h : h + kv]))
            new_kv = torch.stack((k, heads[:, h + kv :]), dim=1)
        else:  # q and k rotated together: one set of ops for both
            qk = rope.apply(heads[:, : h + kv])
            q, new_kv = qk[:, :h], torch.stack((qk[:, h:], heads[:, h + kv :]), dim=1)
        if len(segments) == 1:  # the common case: no packing, no copy into `out`
            return matmul_t(self._attend(q, new_kv, segments[0], caches[0], window), self.o_t)
        out = torch.empty(n, h * hd, dtype=x.dtype)
        row = 0
        for seg, cache in zip(segments, caches, strict=True):
            rows = slice(row, row + seg.length)
            out[rows] = self._attend(q[rows], new_kv[rows], seg, cache, window)
            row += seg.length
        return matmul_t(out, self.o_t)

    def _attend(
        self,
        q: torch.Tensor,
        new_kv: torch.Tensor,
        seg: Segment,
        cache: LayerCache,
        window: int | None,
    ) -> torch.Tensor:
        """One session's rows: store its keys and values `(T_q, 2, kv, hd)` in the cache,
        attend, `(T_q, h hd)`."""
        a = self.args
        h, kv = a.num_heads, a.num_kv_heads
        end_pos = seg.start + seg.length
        cache.kv[:, :, seg.start : end_pos] = new_kv.permute(1, 2, 0, 3)
        first = 0 if window is None else max(0, end_pos - seg.length - window + 1)
        keys = cache.k[:, first:end_pos]  # (kv, T_k, hd)
        values = cache.v[:, first:end_pos]
        mask = _mask(seg, first, window, q.device)
        if seg.length == 1 and mask is None:  # decode: the query's heads in kv groups as is
            o = _attend_one(q.reshape(kv, h // kv, a.head_dim), keys, values, self._scale)
            return o.view(1, h * a.head_dim)
        qs = q.transpose(0, 1)  # (h, T_q, hd)
        if seg.length <= _SMALL_QUERY:
            o = _attend_small(qs, keys, values, mask, self._scale)
        else:
            scale = a.attn_scale if self._scale is not None else 1.0
            o = F.scaled_dot_product_attention(
                qs, keys, values, attn_mask=mask, scale=scale, enable_gqa=h != kv
            )  # (h, T_q, hd)
        return o.transpose(0, 1).reshape(seg.length, h * a.head_dim)


_SMALL_QUERY = 8  # decode-sized queries: two bmm beat SDPA's set-up cost (23 vs 59 us here)


def _attend_one(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor | None
) -> torch.Tensor:
    """Attention of one position's query, grouped `(kv, g, hd)`, over `(kv, T_k, hd)` keys:
    `_attend_small` without the transposes and reshapes a single row does not need."""
    scores = torch.bmm(q, k.transpose(1, 2))  # (kv, g, T_k)
    if scale is not None:
        scores = scores * scale
    if scores.dtype == torch.float32:
        return torch.bmm(torch.softmax(scores, dim=-1), v)
    return torch.bmm(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)


def _attend_small(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of a few queries `(h, T_q, hd)` over `(kv, T_k, hd)` keys with grouped heads;
    `scale` None: the queries come scaled."""
    h, tq, hd = q.shape
    kv = k.shape[0]
    g = h // kv
    scores = torch.bmm(q.reshape(kv, g * tq, hd), k.transpose(1, 2))  # (kv, g T_q, T_k)
    if scale is not None:
        scores = scores * scale
    if mask is not None:
        scores = scores.view(kv, g, tq, -1).masked_fill(~mask, float("-inf")).view(kv, g * tq, -1)
    if scores.dtype == torch.float32:
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.bmm(probs, v).view(h, tq, hd)


def _mask(
    seg: Segment, first: int, window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask (T_q, T_k) allowing causal (and windowed) attention; None when all allowed."""
    if seg.length == 1 and (window is None or seg.start - first < window):
        return None  # one query sees every cached key
    q_pos = torch.arange(seg.start, seg.start + seg.length, device=device).unsqueeze(1)
    k_pos = torch.arange(first, seg.start + seg.length, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)); SiLU (SwiGLU) or tanh-GELU (GeGLU)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.inter = args.intermediate_size
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        # May work in place: it is given a fresh matmul output nothing else reads.
        if args.hidden_act == "silu":
            self.act: Any = lambda t: F.silu(t, inplace=True)
        elif args.hidden_act in ("gelu_pytorch_tanh", "gelu_tanh"):
            self.act = lambda t: F.gelu(t, approximate="tanh")
        else:
            raise ConfigError(f"unsupported activation {args.hidden_act!r}")
        self.gate_up_t: torch.Tensor | None = None
        self.down_t: torch.Tensor | None = None

    @staticmethod
    def fused_shapes(args: ModelArgs) -> list[tuple[int, int]]:
        """Shapes of the matrices `fuse` makes: gate and up, and down, `(in, out)`."""
        return [
            (args.hidden_size, 2 * args.intermediate_size),
            (args.intermediate_size, args.hidden_size),
        ]

    def fuse(self, dtype: torch.dtype | None = None, alloc: Alloc = torch_empty) -> None:
        """Replace the loaded projections by transposed copies, gate and up fused, cast to
        `dtype` (default: the loaded one) in the same copy, made by `alloc`."""
        gate, up = self.gate_proj.weight, self.up_proj.weight
        self.gate_up_t = transposed(gate, up, dtype=dtype, alloc=alloc)
        self.down_t = transposed(self.down_proj.weight, dtype=dtype, alloc=alloc)
        _release(self.gate_proj, self.up_proj, self.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.gate_up_t is not None and self.down_t is not None, "call fuse() after loading"
        gate_up = matmul_t(x, self.gate_up_t)
        # In place on the product's halves: no split, no new tensors (0.6 ms of 33 per token).
        hidden = self.act(gate_up[:, : self.inter]).mul_(gate_up[:, self.inter :])
        return matmul_t(hidden, self.down_t)


class DecoderLayer(nn.Module):
    """Pre-norm decoder block; Gemma 3 adds post-attention and post-feed-forward norms."""

    def __init__(self, args: ModelArgs, index: int) -> None:
        super().__init__()
        self.index = index
        offset = 1.0 if args.gemma else 0.0
        eps = args.rms_norm_eps
        self.sandwich = args.family == "gemma3"
        self.sliding = args.is_sliding(index)
        self.window = args.sliding_window if self.sliding else None
        self.one_row = False  # set by `fuse`: `forward_one` may run this layer's decode steps
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, eps, offset)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps, offset)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(args.hidden_size, eps, offset)

    @staticmethod
    def fused_shapes(args: ModelArgs) -> list[tuple[int, int]]:
        """Shapes of the matrices `fuse` makes for one layer."""
        return [*Attention.fused_shapes(args), *MLP.fused_shapes(args)]

    def fuse(self, dtype: torch.dtype | None = None, alloc: Alloc = torch_empty) -> None:
        """Fuse and transpose the projections of attention and MLP, see `Attention.fuse`.

        In float32 the norms in front of them hand over their scale (`RMSNorm.fold`), and so
        does attention's softmax scale where no QK-norm sits between it and the projection
        (RoPE is linear, so scaling q before it is the same). Other dtypes keep the order of
        operations of the reference, which their rounding would otherwise show."""
        attn, mlp = self.self_attn, self.mlp
        attn.fuse(dtype, alloc)
        mlp.fuse(dtype, alloc)
        assert attn.qkv_t is not None and mlp.gate_up_t is not None
        if attn.qkv_t.dtype != torch.float32:
            return
        pre_mlp = self.pre_feedforward_layernorm if self.sandwich else self.post_attention_layernorm
        with torch.no_grad():
            attn.qkv_t.mul_(self.input_layernorm.fold().float().unsqueeze(1))
            mlp.gate_up_t.mul_(pre_mlp.fold().float().unsqueeze(1))
            if attn.q_norm is None:
                attn.fold_scale()
        self.one_row = attn.pairs and not self.sandwich and self.window is None

    def forward_one(
        self, x: torch.Tensor, rope: RopeAngles, pos: int, cache: LayerCache
    ) -> torch.Tensor:
        """`forward` for one row `(1, hidden)` of one session at position `pos`, a decode step,
        on a layer `fuse` marked `one_row` (float32: norms folded, softmax scale in q, q and k
        in pairs; no window, no sandwich norms). The same arithmetic as `forward`, written out
        without its packing, masks, general shapes and calls: between products that sweep
        the caches each of those costs several us, 0.85 ms a token over SmolLM2's 30 layers."""
        attn, mlp = self.self_attn, self.mlp
        a = attn.args
        hd, h, kv = a.head_dim, a.num_heads, a.num_kv_heads
        assert attn.qkv_t is not None and attn.o_t is not None and attn._scale is None
        assert mlp.gate_up_t is not None and mlp.down_t is not None and rope.cis is not None
        # The folded norm (`RMSNorm.fold`), then q, k and v; q and k rotated in place.
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        qkv = matmul_t(x / torch.hypot(norm, self.input_layernorm._root_dim_eps), attn.qkv_t)
        if attn.qkv_bias is not None:
            qkv = qkv + attn.qkv_bias
        heads = qkv.view(h + 2 * kv, hd)
        torch.view_as_complex(heads[: h + kv].view(1, -1, hd // 2, 2)).mul_(rope.cis)
        # This position's keys and values in one copy, then attention over the cache.
        cache.kv[:, :, pos] = heads[h:].view(2, kv, hd)
        o = _attend_one(
            heads[:h].view(kv, h // kv, hd), cache.k[:, : pos + 1], cache.v[:, : pos + 1], None
        )
        x = matmul_t(o.view(1, h * hd), attn.o_t).add_(x)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        gate_up = matmul_t(
            x / torch.hypot(norm, self.post_attention_layernorm._root_dim_eps), mlp.gate_up_t
        )
        hidden = mlp.act(gate_up[:, : mlp.inter]).mul_(gate_up[:, mlp.inter :])
        return matmul_t(hidden, mlp.down_t).add_(x)

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeAngles,
        segments: Sequence[Segment],
        caches: Sequence[LayerCache],
    ) -> torch.Tensor:
        # Children's `forward` called directly: `Module.__call__` checks for hooks (none are
        # set here), which costs 1-3 us a call on caches the last weight matrix swept.
        attn = self.self_attn.forward(
            self.input_layernorm.forward(x), rope, segments, caches, self.window
        )
        # Residuals added in place to the fresh outputs of the blocks.
        if self.sandwich:
            x = self.post_attention_layernorm.forward(attn).add_(x)
            mlp = self.mlp.forward(self.pre_feedforward_layernorm.forward(x))
            return self.post_feedforward_layernorm.forward(mlp).add_(x)
        x = attn.add_(x)
        return self.mlp.forward(self.post_attention_layernorm.forward(x)).add_(x)


def positions_of(segments: Sequence[Segment]) -> torch.Tensor:
    """Token positions `(N,)` of a packed batch."""
    return torch.cat([torch.arange(s.start, s.start + s.length) for s in segments])


def last_rows(segments: Sequence[Segment]) -> torch.Tensor:
    """Row index of the last token of each segment in a packed batch."""
    ends, row = [], 0
    for s in segments:
        row += s.length
        ends.append(row - 1)
    return torch.tensor(ends)
