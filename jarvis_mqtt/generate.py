"""Token-by-token generation: the bookkeeping shared by every front end, and the local reference.

`Generation` turns sampled ids into text deltas and decides when to stop (EOS, stop strings,
length). The single-process reference `LocalModel` chains the three stages in one process; the
MQTT client drives the same `Generation` with a remote span in the middle.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from jarvis_mqtt.model import Segment
from jarvis_mqtt.runtime import LayerSpan, load_client_stages
from jarvis_mqtt.sampling import Sampler, SamplingParams, find_stop

if TYPE_CHECKING:
    from jarvis_mqtt.checkpoint import ModelDir
    from jarvis_mqtt.tokenizer import Tokenizer


@dataclass
class TokenEvent:
    """One generated token as a front end reports it."""

    token_id: int
    text: str  # text this token added (may be empty mid-way through a UTF-8 character)
    latency: float  # seconds since the previous token (or since the request, for the first)
    route: list[dict[str, object]] = field(default_factory=list)  # hops that served it
    skipped: list[int] = field(default_factory=list)  # layers bypassed for it


@dataclass
class Generation:
    """Stop rules and streaming text for one reply."""

    tokenizer: Tokenizer
    params: SamplingParams
    prompt_ids: list[int]
    generated: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        from jarvis_mqtt.tokenizer import StreamDecoder

        self._stream = StreamDecoder(self.tokenizer)
        self.sampler = Sampler(self.params)

    @property
    def history(self) -> list[int]:
        """Prompt and generated ids (for the repetition penalty)."""
        return self.prompt_ids + self.generated

    def pick(self, logits: torch.Tensor) -> int:
        """Sample the next id from the logits of the last position."""
        return self.sampler(logits, self.history)

    def accept(self, token_id: int) -> str:
        """Record a sampled id; return the text it adds and set `done` when a rule fires."""
        self.generated.append(token_id)
        if token_id in self.tokenizer.eos_token_ids:
            self.done, self.finish_reason = True, "eos"
            return self._stream.flush()
        delta = self._stream.push(token_id)
        before = len(self.text)
        self.text += delta
        cut = find_stop(self.text, self.params.stop)
        if cut is not None:
            delta = self.text[before:cut] if cut > before else ""
            self.text = self.text[:cut]
            self.done, self.finish_reason = True, "stop"
        elif len(self.generated) >= self.params.max_new_tokens:
            self.done, self.finish_reason = True, "length"
            tail = self._stream.flush()
            self.text += tail
            delta += tail
        return delta


class LocalModel:
    """The whole model in one process: the single-process reference."""

    def __init__(self, model_dir: ModelDir, *, dtype: torch.dtype | None = None, **span_kw: int):
        self.model_dir = model_dir
        self.tokenizer = model_dir.tokenizer()
        self.embed, self.head = load_client_stages(model_dir, dtype)
        self.span = LayerSpan.load(model_dir, 0, model_dir.num_layers, dtype=dtype, **span_kw)

    def logits(
        self, tokens: Sequence[int], session: str, start: int = 0, skip: Sequence[int] = ()
    ) -> torch.Tensor:
        """Feed `tokens` at positions from `start`; return logits `(len(tokens), vocab)`."""
        hidden = self.embed(torch.tensor(tokens))
        hidden = self.span(hidden, [Segment(session, start, len(tokens))], skip=skip)
        return self.head(hidden)

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        session: str = "local",
        skip: Sequence[int] = (),
    ) -> Iterator[TokenEvent]:
        """Stream the reply to `prompt_ids`; the session's cache is freed at the end."""
        gen = Generation(self.tokenizer, params, list(prompt_ids))
        t0 = time.perf_counter()
        try:
            logits = self.logits(gen.prompt_ids, session, 0, skip)[-1]
            while True:
                tok = gen.pick(logits)
                text = gen.accept(tok)
                now = time.perf_counter()
                yield TokenEvent(tok, text, now - t0, skipped=list(skip))
                t0 = now
                if gen.done:
                    return
                pos = len(gen.prompt_ids) + len(gen.generated) - 1
                logits = self.logits([tok], session, pos, skip)[-1]
        finally:
            self.span.free(session)
