"""Next-token sampling: greedy, temperature, top-k, top-p, repetition penalty, seeded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick the next token and when to stop."""

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    repetition_penalty: float = 1.0  # 1 disables; >1 discourages tokens already seen
    seed: int | None = None
    max_new_tokens: int = 128
    stop: tuple[str, ...] = field(default=())  # stop strings, matched on the decoded text

    def to_dict(self) -> dict[str, object]:
        """Plain dict for the wire or JSON."""
        return {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
            "stop": list(self.stop),
        }


class Sampler:
    """Stateful sampler for one sequence (owns its random generator)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """Pick a token id from logits `(vocab,)`, given the ids seen so far."""
        p = self.params
        logits = logits.float()
        if p.repetition_penalty != 1.0 and history:
            ids = torch.tensor(sorted(set(history)), dtype=torch.long)
            seen = logits[ids]
            # The CTRL rule, as Hugging Face applies it: shrink positive, grow negative scores.
            logits = logits.clone()
            logits[ids] = torch.where(
                seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty
            )
        if p.temperature <= 0.0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k > 0:
            k = min(p.top_k, logits.shape[-1])
            kth = torch.topk(logits, k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
            # Drop tokens once the mass before them already exceeds top_p (keep at least one).
            drop = cumulative - torch.softmax(sorted_logits, -1) > p.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
        probs = torch.softmax(logits, -1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for s in stops if s and (i := text.find(s)) >= 0]
    return min(hits) if hits else None
