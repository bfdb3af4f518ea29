"""Run the model with layers skipped, as the mesh does, and read log-probabilities off the head.

The model is held as one single-layer `LayerSpan` per decoder layer: a mesh of one-layer nodes
in one process. A skip set is a set of those nodes gone; the route through the rest comes from
`routing.next_hop` with skipping allowed, the function every sender of the mesh routes by, and
each hop runs its span as a node does (`span(x, segments, skip=layers entered past)`). So the
evaluation skips exactly what the mesh would skip. Because layers before the first skipped one
compute what the intact model computes, a skip set's run starts from the intact hidden states
recorded at its first skipped layer: a sweep of single and paired skips costs about half of
running them all in full.

Prompts are packed several sessions to a forward. Four answers to one prompt share its prompt:
it is prefilled once, its KV caches are copied into one session per answer (`fork`), and only
the answers' own tokens run again.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from jarvis_mqtt.errors import ConfigError
from jarvis_mqtt.generate import Generation
from jarvis_mqtt.membership import NodeStatus
from jarvis_mqtt.model import LayerCache, Segment
from jarvis_mqtt.routing import Hop, next_hop
from jarvis_mqtt.runtime import LayerSpan, SessionState, load_client_stages
from jarvis_mqtt.sampling import SamplingParams

if TYPE_CHECKING:
    from jarvis_mqtt.checkpoint import ModelDir

HEAD_ROWS = 64  # rows per head call: bounds the (rows, vocab) logits of a 262k-vocab model
Skip = frozenset[int]
INTACT: Skip = frozenset()


class Tracker(Protocol):
    """Where progress goes (a rich bar in the CLI, nothing in tests)."""

    def start(self, total: int, what: str) -> None:
        """A new task of `total` steps."""

    def advance(self, n: int = 1) -> None:
        """`n` steps done."""


@dataclass
class Plan:
    """One packed batch: what to run, which output rows go through the head, what to read there.

    Output rows are numbered over the prompts' tokens, then the continuations' run tokens (all
    but each continuation's last, whose output predicts nothing that is scored).
    """

    prompts: list[list[int]]
    continuations: list[list[list[int]]]  # per prompt; may be empty
    rows: torch.Tensor  # (R,) output rows fed to the head
    buckets: torch.Tensor  # (R,) bucket of each head row, for KL and agreement
    gather_row: torch.Tensor  # (G,) index into `rows`
    gather_token: torch.Tensor  # (G,) token whose log-probability is read there
    gather_slot: torch.Tensor  # (G,) accumulator the log-probability is added to
    slots: int
    n_buckets: int

    @property
    def tokens(self) -> int:
        """Tokens this plan runs through the layers."""
        run = sum(len(c) - 1 for cs in self.continuations for c in cs)
        return sum(len(p) for p in self.prompts) + run


class PlanBuilder:
    """Collects prompts and the log-probabilities to read, then freezes them into a `Plan`."""

    def __init__(self, n_buckets: int) -> None:
        self.n_buckets = n_buckets
        self.prompts: list[list[int]] = []
        self.continuations: list[list[list[int]]] = []
        self._prompt_rows = 0
        self._pending: list[tuple[int, int, list[int], int, int]] = []  # (p, c, cont, slot, b)
        self._pending_prompt: list[tuple[int, int, int]] = []  # (p, slot, bucket)
        self.slots = 0

    def add_prompt(self, prompt: Sequence[int], continuations: Sequence[Sequence[int]]) -> int:
        """Add a prompt and its continuations; return its index."""
        self.prompts.append(list(prompt))
        self.continuations.append([list(c) for c in continuations])
        return len(self.prompts) - 1

    def new_slot(self) -> int:
        """A fresh accumulator."""
        self.slots += 1
        return self.slots - 1

    def score_continuation(self, p: int, c: int, slot: int, bucket: int) -> None:
        """Add log P(continuation c | prompt p) to `slot`; its positions count in `bucket`."""
        self._pending.append((p, c, self.continuations[p][c], slot, bucket))

    def score_prompt(self, p: int, slot: int, bucket: int) -> None:
        """Add the log-likelihood of prompt p's own tokens after the first to `slot`."""
        self._pending_prompt.append((p, slot, bucket))

    def build(self) -> Plan:
        """Freeze into tensors."""
        starts = list(itertools.accumulate((len(p) for p in self.prompts), initial=0))
        cont_row = starts[-1]
        cont_start: dict[tuple[int, int], int] = {}
        for p, cs in enumerate(self.continuations):
            for c, cont in enumerate(cs):
                cont_start[p, c] = cont_row
                cont_row += len(cont) - 1
        head_rows: dict[int, int] = {}  # output row -> index among head rows
        buckets: list[int] = []
        g_row: list[int] = []
        g_tok: list[int] = []
        g_slot: list[int] = []

        def read(out_row: int, token: int, slot: int, bucket: int) -> None:
            if out_row not in head_rows:
                head_rows[out_row] = len(head_rows)
                buckets.append(bucket)
            g_row.append(head_rows[out_row])
            g_tok.append(token)
            g_slot.append(slot)

        for p, c, cont, slot, bucket in self._pending:
            read(starts[p + 1] - 1, cont[0], slot, bucket)  # the prompt's last row
            for t in range(1, len(cont)):
                read(cont_start[p, c] + t - 1, cont[t], slot, bucket)
        for p, slot, bucket in self._pending_prompt:
            prompt = self.prompts[p]
            for t in range(1, len(prompt)):
                read(starts[p] + t - 1, prompt[t], slot, bucket)
        order = sorted(head_rows, key=head_rows.__getitem__)
        return Plan(
            prompts=self.prompts,
            continuations=self.continuations,
            rows=torch.tensor(order, dtype=torch.long),
            buckets=torch.tensor(buckets, dtype=torch.long),
            gather_row=torch.tensor(g_row, dtype=torch.long),
            gather_token=torch.tensor(g_tok, dtype=torch.long),
            gather_slot=torch.tensor(g_slot, dtype=torch.long),
            slots=self.slots,
            n_buckets=self.n_buckets,
        )


@dataclass
class Outcome:
    """What one plan gave under one skip set."""

    logprob: torch.Tensor  # (slots,) summed log-probabilities
    kl: torch.Tensor  # (buckets,) summed KL(intact || this) over head rows, nats
    agree: torch.Tensor  # (buckets,) head rows whose argmax matches the intact model's
    rows: torch.Tensor  # (buckets,) head rows


@dataclass
class _Run:
    """Hidden states of one forward: prompt rows and continuation rows, per layer if recorded."""

    prompt: torch.Tensor
    cont: torch.Tensor
    record: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def kl_agreement(ref: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of log-probabilities `(rows, vocab)`: KL(ref || other) in nats, and 1.0 where
    both put their top-1 on the same token (float64, for summing)."""
    kl = (ref.exp() * (ref - other)).sum(-1).clamp_min(0)  # rounding can dip below 0
    same = ref.argmax(-1) == other.argmax(-1)
    return kl.double(), same.double()


def skip_route(num_layers: int, skip: Skip) -> list[Hop]:
    """The hops an activation takes through one-layer nodes when the nodes of `skip` are gone.

    Built by `next_hop` with skipping allowed and nothing never-skip, as a sender routes it;
    the last hop (node None) returns to the client, which applies the head.
    """
    live = [
        NodeStatus(node_id=f"layer-{i}", model="eval", start=i, end=i + 1)
        for i in range(num_layers)
        if i not in skip
    ]
    hops: list[Hop] = []
    layer = 0
    while True:
        hop = next_hop(live, layer, num_layers, allow_skip=True)
        hops.append(hop)
        if hop.node_id is None:
            break
        layer = hop.end
    skipped = {i for h in hops for i in h.skipped}
    if skipped != set(skip):  # a skip set naming layers the model does not have
        raise ConfigError(f"skip set {sorted(skip)} is not a route's skips {sorted(skipped)}")
    return hops


def fork(span: LayerSpan, src: str, dst: str) -> None:
    """Give session `dst` a copy of session `src`'s KV caches in `span`."""
    state = span.sessions[src]
    caches = [LayerCache(c.kv.clone()) for c in state.caches]
    span.sessions[dst] = SessionState(caches=caches, filled=list(state.filled))


class Evaluator:
    """The model as a chain of single-layer spans, scored under any set of skipped layers."""

    def __init__(self, model_dir: ModelDir, *, dtype: torch.dtype | None = None) -> None:
        self.model_dir = model_dir
        self.tokenizer = model_dir.tokenizer()
        self.embed, self.head = load_client_stages(model_dir, dtype)
        self.num_layers = model_dir.num_layers
        self.spans = [
            LayerSpan.load(model_dir, i, i + 1, dtype=dtype) for i in range(self.num_layers)
        ]
        self.max_len = self.spans[0].max_seq_len  # tokens
        self._ids = itertools.count()

    # -- forward -------------------------------------------------------------------------------

    def _forward(self, plan: Plan, skip: Skip, start: _Run | None, record: bool) -> _Run:
        """Layers from min(skip) (or 0) to the end; `start` holds the intact inputs there."""
        first = min(skip) if skip and start is not None else 0
        if first == 0:
            p_ids = torch.tensor([t for p in plan.prompts for t in p], dtype=torch.long)
            c_ids = [t for cs in plan.continuations for c in cs for t in c[:-1]]
            h_p = self.embed(p_ids)
            h_c = self.embed(torch.tensor(c_ids, dtype=torch.long)) if c_ids else h_p[:0]
        else:
            assert start is not None
            h_p, h_c = start.record[first]
        run = next(self._ids)
        p_segs = [Segment(f"e{run}.{i}", 0, len(p)) for i, p in enumerate(plan.prompts)]
        c_segs: list[Segment] = []
        parents: list[str] = []
        for i, cs in enumerate(plan.continuations):
            for c, cont in enumerate(cs):
                if len(cont) > 1:
                    c_segs.append(Segment(f"e{run}.{i}.{c}", len(plan.prompts[i]), len(cont) - 1))
                    parents.append(p_segs[i].session)
        out = _Run(h_p, h_c)
        try:
            for hop in skip_route(self.num_layers, skip):
                if hop.node_id is None or hop.enter < first:
                    continue  # the client's head; or a layer whose output `start` recorded
                if record:
                    out.record.append((h_p, h_c))
                span = self.spans[hop.enter]
                entered_past = range(span.start, hop.enter)  # what a node skips in its span
                h_p = span(h_p, p_segs, skip=entered_past)
                if c_segs:
                    for seg, parent in zip(c_segs, parents, strict=True):
                        fork(span, parent, seg.session)
                    h_c = span(h_c, c_segs, skip=entered_past)
        finally:
            for span in self.spans:
                for seg in (*p_segs, *c_segs):
                    span.free(seg.session)
        out.prompt, out.cont = h_p, h_c
        return out

    def _read(
        self, plan: Plan, run: _Run, intact: list[torch.Tensor] | None
    ) -> tuple[Outcome, list[torch.Tensor]]:
        """Head over the plan's rows, in chunks; with `intact`, compare to those log-probs.

        Without `intact` this is the reference: its log-prob chunks are returned for the others.
        """
        hidden = torch.cat([run.prompt, run.cont])[plan.rows]
        logprob = torch.zeros(plan.slots, dtype=torch.float64)
        kl = torch.zeros(plan.n_buckets, dtype=torch.float64)
        agree = torch.zeros(plan.n_buckets, dtype=torch.float64)
        rows = torch.zeros(plan.n_buckets, dtype=torch.float64)
        keep = intact is None
        chunks: list[torch.Tensor] = []
        for k, lo in enumerate(range(0, hidden.shape[0], HEAD_ROWS)):
            hi = min(lo + HEAD_ROWS, hidden.shape[0])
            lp = torch.log_softmax(self.head(hidden[lo:hi]), dim=-1)  # (rows, vocab)
            sel = (plan.gather_row >= lo) & (plan.gather_row < hi)
            vals = lp[plan.gather_row[sel] - lo, plan.gather_token[sel]].double()
            logprob.index_add_(0, plan.gather_slot[sel], vals)
            b = plan.buckets[lo:hi]
            rows.index_add_(0, b, torch.ones(hi - lo, dtype=torch.float64))
            if keep:
                chunks.append(lp)
                agree.index_add_(0, b, torch.ones(hi - lo, dtype=torch.float64))
            else:
                assert intact is not None
                row_kl, same = kl_agreement(intact[k], lp)
                kl.index_add_(0, b, row_kl)
                agree.index_add_(0, b, same)
        return Outcome(logprob, kl, agree, rows), chunks

    def run(
        self, plan: Plan, skips: Sequence[Skip], tracker: Tracker | None = None
    ) -> dict[Skip, Outcome]:
        """Score one plan intact and under each skip set (the intact run is the KL reference).

        The tracker advances one step after each of those runs.
        """
        others = [s for s in dict.fromkeys(skips) if s]
        base = self._forward(plan, INTACT, None, record=bool(others))
        outcome, intact_lp = self._read(plan, base, None)
        results = {INTACT: outcome}
        if tracker is not None:
            tracker.advance()
        for skip in others:
            results[skip] = self._read(plan, self._forward(plan, skip, base, False), intact_lp)[0]
            if tracker is not None:
                tracker.advance()
        return results

    # -- generation ----------------------------------------------------------------------------

    def _step(self, tokens: Sequence[int], session: str, start: int, skip: Skip) -> torch.Tensor:
        h = self.embed(torch.tensor(list(tokens), dtype=torch.long))
        seg = [Segment(session, start, len(tokens))]
        for hop in skip_route(self.num_layers, skip):
            if hop.node_id is not None:
                span = self.spans[hop.enter]
                h = span(h, seg, skip=range(span.start, hop.enter))
        return self.head(h[-1:])[0]

    def generate(self, prompt: Sequence[int], skip: Skip = INTACT, max_new_tokens: int = 32) -> str:
        """Greedy reply to `prompt` with `skip` bypassed (the single-process reference loop)."""
        gen = Generation(self.tokenizer, SamplingParams(max_new_tokens=max_new_tokens), [*prompt])
        session = f"g{next(self._ids)}"
        try:
            logits = self._step(gen.prompt_ids, session, 0, skip)
            while True:
                gen.accept(gen.pick(logits))
                if gen.done:
                    return gen.text
                pos = len(gen.prompt_ids) + len(gen.generated) - 1
                logits = self._step(gen.generated[-1:], session, pos, skip)
        finally:
            for span in self.spans:
                span.free(session)


def batches(sizes: Iterable[int], budget: int) -> list[list[int]]:
    """Group indices into runs of at most `budget` tokens (a larger one goes alone)."""
    out: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if out[-1] and used + n > budget:
            out.append([])
            used = 0
        out[-1].append(i)
        used += n
    return [b for b in out if b]


def run_all(
    ev: Evaluator,
    plans: Sequence[Plan],
    skips: Sequence[Skip],
    tracker: Tracker | None = None,
    what: str = "scoring",
) -> dict[Skip, list[Outcome]]:
    """`Evaluator.run` over many plans, tracked as one task of (plans x skip sets) steps."""
    out: dict[Skip, list[Outcome]] = {s: [] for s in dict.fromkeys([INTACT, *skips])}
    if tracker is not None:
        tracker.start(len(plans) * len(out), what)
    for plan in plans:
        for skip, outcome in ev.run(plan, skips, tracker).items():
            out[skip].append(outcome)
    return out


def perplexity_of(nll: float, tokens: int) -> float:
    """exp(mean negative log-likelihood), inf when there is nothing to average."""
    return math.exp(nll / tokens) if tokens else math.inf
