"""What a node computes in one forward step: waiting activations packed together (pure logic
over the inbox, and the step itself on the span; no network, no event loop)."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from jarvis_mqtt import wire
from jarvis_mqtt.errors import SessionError
from jarvis_mqtt.model import Segment
from jarvis_mqtt.runtime import LayerSpan


@dataclass
class Work:
    """One accepted activation waiting for compute."""

    msg: wire.ActivationMessage
    hidden: torch.Tensor  # (tokens, hidden) in the span's dtype
    t_in: float  # wall clock when it arrived
    replay_steps: list[int] | None = None  # a replay's original step lengths: it runs alone


@dataclass
class Outcome:
    """What one forward step produced for one piece of work."""

    work: Work
    hidden: torch.Tensor | None = None
    raw: wire.RawTensor | None = None  # `hidden` as the wire sends it, taken on the worker
    error: SessionError | None = None


def take_batch(
    inbox: collections.deque[Work], max_tokens: int
) -> tuple[list[Work], collections.deque[Work]]:
    """(work that can share one forward, the rest in order): the entry layer of the oldest,
    one message per session, at most `max_tokens` rows unless a single message has more;
    a replay runs alone, step by step."""
    if not inbox:
        return [], inbox
    first, rest = inbox[0], itertools.islice(inbox, 1, None)
    batch, left = [first], collections.deque[Work]()
    if first.replay_steps is not None:
        left.extend(rest)
        return batch, left
    sessions, tokens = {first.msg.sid}, first.msg.n_tokens
    for w in rest:
        fits = tokens + w.msg.n_tokens <= max_tokens
        same = w.msg.layer == first.msg.layer and w.replay_steps is None
        if same and w.msg.sid not in sessions and fits:
            batch.append(w)
            sessions.add(w.msg.sid)
            tokens += w.msg.n_tokens
        else:
            left.append(w)
    return batch, left


def forward(span: LayerSpan, batch: Sequence[Work]) -> list[Outcome]:
    """One packed step over `batch` (all entering at the same layer), or one by one when a
    session fails, so that the others are still served. Runs on the span's worker thread."""
    skip = range(span.start, batch[0].msg.layer)  # entered mid-span
    segments = [Segment(w.msg.sid, w.msg.pos, w.msg.n_tokens) for w in batch]
    steps = batch[0].replay_steps if len(batch) == 1 else None
    try:
        if steps is not None:  # the original steps again: the same shapes, the same cache
            w, parts, at = batch[0], [], 0
            for n in steps:
                seg = Segment(w.msg.sid, w.msg.pos + at, n)
                parts.append(span(w.hidden[at : at + n], [seg], skip=skip))
                at += n
            out = torch.cat(parts)
        else:
            rows = batch[0].hidden if len(batch) == 1 else torch.cat([w.hidden for w in batch])
            out = span(rows, segments, skip=skip)
    except SessionError as e:
        if len(batch) == 1:
            return [Outcome(batch[0], error=e)]
        return [o for w in batch for o in forward(span, [w])]
    outcomes, row, raw = [], 0, wire.RawTensor.of(out)
    for w in batch:
        n = w.msg.n_tokens
        outcomes.append(Outcome(w, out[row : row + n], raw.rows(row, row + n)))
        row += n
    return outcomes


def replay_steps(msg: wire.ActivationMessage) -> list[int] | None:
    """The original step lengths of a replay message, when it carries valid ones."""
    steps = msg.meta.get("steps") if msg.meta.get("replay") else None
    if (
        isinstance(steps, list)
        and steps
        and all(isinstance(n, int) and n > 0 for n in steps)
        and sum(steps) == msg.n_tokens
    ):
        return steps
    return None
