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
    """Precomputed cos/sin per position, `(max_len, head_dim)` each, rotate-half layout."""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def build(
        cls, args: ModelArgs, theta: float, max_len: int, dtype: torch.dtype, *, scaled: bool
    ) -> RopeTable:
        """Tables for positions `[0, max_len)`; `scaled` applies the config's RoPE scaling."""
        scaling = dict(args.rope_scaling) if args.rope_scaling and scaled else None
        inv = _inv_freq(args, theta, scaling)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        return cls(cos=emb.cos().to(dtype), sin=emb.sin().to(dtype))

    def at(self, positions: torch.Tensor) -> RopeAngles:
        """The angles of `positions` (N,), looked up once per forward for every layer."""
        cos = self.cos[positions].unsqueeze(1)  # (N, 1, head_dim)
        sin = self.sin[positions].unsqueeze(1)
        half = sin.shape[-1] // 2
        # The sign of rotate-half folded into sin: x * cos + roll(x) * signed_sin.
        signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return RopeAngles(cos, signed, half)


@dataclass(frozen=True)
class RopeAngles:
    """cos and signed sin at the positions of one packed batch, `(N, 1, head_dim)` each."""

    cos: torch.Tensor
    signed_sin: torch.Tensor
    half: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate `x` of shape (N, heads, head_dim), rotate-half layout (as Hugging Face).

        `roll` by half a head gives (x2, x1); with sin's first half negated this is exactly
        `x * cos + cat(-x2, x1) * sin`, in four ops instead of seven.
        """
        return x * self.cos + x.roll(self.half, dims=-1) * self.signed_sin
