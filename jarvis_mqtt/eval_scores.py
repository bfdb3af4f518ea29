"""MMLU accuracy and perplexity, intact and under skip sets, with KL and agreement to the intact.

Accuracy is read from log-likelihoods (no sampling): in the letter format, the answer is the
letter among " A" .. " D" the model finds likeliest after "Answer:"; in the cloze format, the
answer text with the highest log-likelihood per character (lighteval's `acc_norm`).
KL(intact || skipped) and top-1 agreement are averaged over every position the scorer reads:
the answer position of each letter prompt, each answer token of each cloze continuation, each
token of a perplexity text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from jarvis_mqtt.eval_data import CHANCE, LETTERS, Item
from jarvis_mqtt.eval_engine import (
    INTACT,
    Evaluator,
    Outcome,
    Plan,
    PlanBuilder,
    Skip,
    Tracker,
    batches,
    perplexity_of,
    run_all,
)

FORMATS = ("letter", "cloze")
BATCH_TOKENS = 1024  # tokens per packed forward


@dataclass
class FormatStats:
    """Accuracy and closeness to the intact model in one prompt format."""

    correct: int = 0
    correct_unnormalised: int = 0  # cloze by raw log-likelihood (favours short answers)
    total: int = 0
    kl: float = 0.0  # summed over positions, nats
    agree: float = 0.0  # positions whose top-1 token matches the intact model's
    positions: int = 0
    by_subject: dict[str, list[int]] = field(default_factory=dict)  # subject -> [correct, total]

    def to_dict(self, fmt: str, subjects: bool = False) -> dict[str, Any]:
        """Plain JSON numbers (rates, not sums)."""
        d: dict[str, Any] = {
            "accuracy": self.correct / self.total if self.total else None,
            "questions": self.total,
            "kl": self.kl / self.positions if self.positions else None,
            "agreement": self.agree / self.positions if self.positions else None,
            "positions": self.positions,
        }
        if fmt == "cloze":
            d["accuracy_unnormalised"] = (
                self.correct_unnormalised / self.total if self.total else None
            )
        if subjects:
            d["by_subject"] = {
                s: {"accuracy": c / n, "questions": n}
                for s, (c, n) in sorted(self.by_subject.items())
            }
        return d


def mmlu_plans(items: Sequence[Item], budget: int = BATCH_TOKENS) -> list[tuple[Plan, list[Item]]]:
    """Pack items into plans; slot 4*k+c of a plan holds log P(answer c) of its k-th item."""
    sizes = [len(it.prompt) + sum(len(c) - 1 for c in it.continuations) for it in items]
    out = []
    for group in batches(sizes, budget):
        b = PlanBuilder(n_buckets=len(FORMATS))
        chosen = [items[i] for i in group]
        for it in chosen:
            p = b.add_prompt(it.prompt, it.continuations)
            for c in range(len(it.continuations)):
                b.score_continuation(p, c, b.new_slot(), FORMATS.index(it.fmt))
        out.append((b.build(), chosen))
    return out


def tally(
    plans: Sequence[tuple[Plan, list[Item]]], outcomes: Sequence[Outcome]
) -> dict[str, FormatStats]:
    """Per-format statistics of one skip set over all plans."""
    stats = {f: FormatStats() for f in FORMATS}
    for (_, chosen), outcome in zip(plans, outcomes, strict=True):
        for k, it in enumerate(chosen):
            n = len(it.continuations)
            lp = outcome.logprob[n * k : n * (k + 1)]
            per_char = lp / torch.tensor(it.chars, dtype=lp.dtype)
            s = stats[it.fmt]
            right = int(torch.argmax(per_char if it.fmt == "cloze" else lp)) == it.question.answer
            s.correct += right
            s.correct_unnormalised += int(torch.argmax(lp)) == it.question.answer
            s.total += 1
            sub = s.by_subject.setdefault(it.question.subject, [0, 0])
            sub[0] += right
            sub[1] += 1
        for f, st in stats.items():
            b = FORMATS.index(f)
            st.kl += float(outcome.kl[b])
            st.agree += float(outcome.agree[b])
            st.positions += int(outcome.rows[b])
    return stats


def summarise(stats: dict[str, FormatStats], subjects: bool = False) -> dict[str, Any]:
    """One skip set's JSON: each format, and KL / agreement pooled over all positions."""
    used = {f: s for f, s in stats.items() if s.total}
    positions = sum(s.positions for s in used.values())
    return {
        **{f: s.to_dict(f, subjects) for f, s in used.items()},
        "kl": sum(s.kl for s in used.values()) / positions if positions else None,
        "agreement": sum(s.agree for s in used.values()) / positions if positions else None,
        "positions": positions,
    }


def score_mmlu(
    ev: Evaluator,
    items: Sequence[Item],
    skips: Sequence[Skip],
    tracker: Tracker | None = None,
    subjects: bool = False,
) -> dict[Skip, dict[str, Any]]:
    """Score items intact and under each skip set."""
    plans = mmlu_plans(items)
    outcomes = run_all(ev, [p for p, _ in plans], skips, tracker, "MMLU")
    return {s: summarise(tally(plans, o), subjects) for s, o in outcomes.items()}


def perplexity_plans(
    docs: Sequence[Sequence[int]], window: int, budget: int = BATCH_TOKENS
) -> list[Plan]:
    """Cut each document into windows of at most `window` tokens and pack them into plans."""
    windows = [list(d[i : i + window]) for d in docs for i in range(0, len(d), window)]
    windows = [w for w in windows if len(w) > 1]
    plans = []
    for group in batches([len(w) for w in windows], max(budget, window)):
        b = PlanBuilder(n_buckets=1)
        slot = b.new_slot()
        for i in group:
            b.score_prompt(b.add_prompt(windows[i], []), slot, 0)
        plans.append(b.build())
    return plans


def score_perplexity(
    ev: Evaluator,
    docs: Sequence[Sequence[int]],
    skips: Sequence[Skip],
    window: int = 512,
    tracker: Tracker | None = None,
) -> dict[Skip, dict[str, Any]]:
    """Perplexity of the documents' tokens (each window's first token is context only)."""
    plans = perplexity_plans(docs, window)
    outcomes = run_all(ev, plans, skips, tracker, "perplexity")
    out = {}
    for skip, outs in outcomes.items():
        nll = -sum(float(o.logprob.sum()) for o in outs)
        tokens = sum(int(o.rows.sum()) for o in outs)
        kl = sum(float(o.kl.sum()) for o in outs)
        agree = sum(float(o.agree.sum()) for o in outs)
        out[skip] = {
            "perplexity": perplexity_of(nll, tokens),
            "nll": nll / tokens if tokens else None,
            "tokens": tokens,
            "kl": kl / tokens if tokens else None,
            "agreement": agree / tokens if tokens else None,
        }
    return out


__all__ = ["CHANCE", "FORMATS", "INTACT", "LETTERS", "score_mmlu", "score_perplexity"]
