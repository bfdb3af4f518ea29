"""Rotary position embeddings: per-position tables, and their angles for one packed batch."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from jarvis_mqtt.model import ModelArgs


def _inv_freq(args: ModelArgs, theta: float, scaling: Mapping[str, Any] | None) -> torch.Tensor:
    dim = args.head_dim
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if not scaling:
        return inv
    if scaling["rope_type"] == "linear":
        return inv / float(scaling["factor"])
    # Llama 3.1 frequency-dependent scaling.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


@dataclass
class RopeTable:
    """Precomputed cos and signed sin per position, `(max_len, head_dim)` each, rotate-half
    layout (see `RopeAngles.apply`); in float32 also `cis = cos + i sin`, `(max_len,
    head_dim / 2)`, for heads whose dimensions are stored in pairs (`RopeAngles.rotate_pairs_`)."""

    cos: torch.Tensor
    signed_sin: torch.Tensor
    cis: torch.Tensor | None = None

    @classmethod
    def build(
        cls, args: ModelArgs, theta: float, max_len: int, dtype: torch.dtype, *, scaled: bool
    ) -> RopeTable:
        """Tables for positions `[0, max_len)`; `scaled` applies the config's RoPE scaling."""
        scaling = dict(args.rope_scaling) if args.rope_scaling and scaled else None
        inv = _inv_freq(args, theta, scaling)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        half = args.head_dim // 2
        # The sign of rotate-half folded into sin: x * cos + roll(x) * signed_sin.
        signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        # The same cos and sin values, so both layouts rotate by exactly the same numbers.
        cis = torch.complex(cos[:, :half], sin[:, :half]) if dtype == torch.float32 else None
        return cls(cos=cos, signed_sin=signed, cis=cis)

    def at(self, positions: torch.Tensor) -> RopeAngles:
        """The angles of `positions` (N,), looked up once per forward for every layer."""
        cos = self.cos[positions].unsqueeze(1)  # (N, 1, head_dim)
        signed = self.signed_sin[positions].unsqueeze(1)
        cis = None if self.cis is None else self.cis[positions].unsqueeze(1)
        return RopeAngles(cos, signed, cos.shape[-1] // 2, cis)


@dataclass(frozen=True)
class RopeAngles:
    """cos and signed sin at the positions of one packed batch, `(N, 1, head_dim)` each, and
    in float32 `cis`, `(N, 1, head_dim / 2)` complex."""

    cos: torch.Tensor
    signed_sin: torch.Tensor
    half: int
    cis: torch.Tensor | None = None

    def rotate_pairs_(self, x: torch.Tensor) -> None:
        """Rotate `x` (N, heads, head_dim) or (N, heads * head_dim) in place, its dimensions
        stored in pairs: (d_0, d_half, d_1, d_half+1, ...), which `pair_order` gives a
        projection.

        Rotate-half turns each (d_i, d_{i+half}) by angle i; read as one complex number per
        pair, that is a single complex product, one op where `apply` takes four and a copy."""
        assert self.cis is not None, "pairs are rotated in float32 only"
        torch.view_as_complex(x.view(x.shape[0], -1, self.half, 2)).mul_(self.cis)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate `x` of shape (N, heads, head_dim), rotate-half layout (as Hugging Face).

        `roll` by half a head gives (x2, x1); with sin's first half negated this is exactly
        `x * cos + cat(-x2, x1) * sin`, in four ops instead of seven.
        """
        return x * self.cos + x.roll(self.half, dims=-1) * self.signed_sin


def pair_order(rows: torch.Tensor, heads: int) -> None:
    """Reorder, in place, the head dimensions of `rows` (..., heads * head_dim) from
    rotate-half layout (d_0 .. d_{half-1}, d_half .. d_{hd-1}) to pairs (d_0, d_half, d_1, ...).

    Applied to the columns of both the q and the k projection, it leaves every q·k product
    (attention's scores) unchanged; the keys in the cache are then stored in this order too."""
    hd = rows.shape[-1] // heads
    with torch.no_grad():
        for head in range(heads):  # a head at a time: small temporaries, none of the whole
            block = rows[..., head * hd : (head + 1) * hd]
            pairs = block.unflatten(-1, (2, hd // 2)).transpose(-1, -2).clone()
            block.copy_(pairs.flatten(-2))
