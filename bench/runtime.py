"""Runtime speed and memory: our decode against transformers and against matmul-only floors.

Every rate comes from the same process, model, thread count and prompt. The repeats are
interleaved (ours, transformers, floor, naive floor, ours, ...) so that a change in machine
load during the run hits all of them alike; each rate is reported as best-of and median.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.procs import baseline_rss, machine, mib, rss_figure
from bench.report import Figure, Section, Stats
from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.matmul import matmul_t
from jarvis_mqtt.model import DecoderLayer, Segment
from jarvis_mqtt.runtime import EmbedStage, HeadStage, LayerSpan, load_client_stages

PROMPT_TOKENS = 64  # prompt before the timed decode
DECODE_TOKENS = 32  # tokens per timed decode run: short runs, many rounds (see REPEATS)
PREFILL_TOKENS = 256  # prompt length of the prefill figure
WARMUP = 1  # untimed rounds first
REPEATS = 8  # timed rounds of decode: more chances to catch a quiet machine
PREFILL_REPEATS = 3  # timed rounds of prefill
ONE_THREAD_REPEATS = 4  # timed rounds of the 1-thread comparison (when threads > 1)
MIN_ROUNDS = 3  # timed rounds always run, whatever the time budget
DECODE_BUDGET = 90.0  # seconds: no new decode round after this (a loaded machine is slow)
TARGET_VS_TRANSFORMERS = 1.25
TARGET_VS_FLOOR = 0.85


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    """A fixed pseudo-random prompt of `n` ids (no special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n,), generator=g).tolist()


@dataclass
class Ours:
    """Our runtime, the whole model in one process."""

    embed: EmbedStage
    head: HeadStage
    span: LayerSpan

    @classmethod
    def load(cls, md: ModelDir) -> Ours:
        embed, head = load_client_stages(md)
        return cls(embed, head, LayerSpan.load(md, 0, md.num_layers))

    def decode(self, ids: list[int], n: int, sid: str) -> tuple[float, list[int]]:
        """(tok/s of `n` greedy decode steps after an untimed prefill of `ids`, the tokens)."""
        span, embed, head = self.span, self.embed, self.head
        h = span(embed(torch.tensor(ids)), [Segment(sid, 0, len(ids))])
        tok = int(head(h[-1:]).argmax())
        out = [tok]
        t0 = time.perf_counter()
        for i in range(n):
            h = span(embed(torch.tensor([tok])), [Segment(sid, len(ids) + i, 1)])
            tok = int(head(h).argmax())
            out.append(tok)
        rate = n / (time.perf_counter() - t0)
        span.free(sid)
        return rate, out

    def prefill(self, ids: list[int], sid: str) -> float:
        """Tokens/s of one prefill (all layers, the head on the last position only)."""
        t0 = time.perf_counter()
        h = self.span(self.embed(torch.tensor(ids)), [Segment(sid, 0, len(ids))])
        self.head(h[-1:]).argmax()
        rate = len(ids) / (time.perf_counter() - t0)
        self.span.free(sid)
        return rate

    def matmul_calls(self) -> list[torch.Tensor]:
        """The (in, out) weights our decode multiplies by, in call order, per token."""
        ws: list[torch.Tensor] = []
        for layer in self.span.layers:
            assert isinstance(layer, DecoderLayer)
            a, m = layer.self_attn, layer.mlp
            assert a.qkv_t is not None and a.o_t is not None
            assert m.gate_up_t is not None and m.down_t is not None
            ws += [a.qkv_t, a.o_t, m.gate_up_t, m.down_t]
        assert self.head.lm_head_t is not None
        return [*ws, self.head.lm_head_t]


def hf_model(md: ModelDir) -> Any:
    """transformers' own model class for this config, with the same weights, SDPA attention."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**md.config)
    cfg._attn_implementation = "sdpa"
    # Built on the CPU, not meta: rotary buffers are computed at construction time.
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=md.dtype)
    stage = md.load_stage()
    sd = {f"model.{k}": v for k, v in stage.items() if k != "lm_head.weight"}
    sd["lm_head.weight"] = stage.get("lm_head.weight", stage["embed_tokens.weight"])
    for i in range(md.num_layers):
        sd.update({f"model.layers.{i}.{k}": v for k, v in md.load_layer(i).items()})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def hf_decode(model: Any, ids: list[int], n: int) -> tuple[float, list[int]]:
    """Tok/s of transformers' manual greedy decode with its KV cache, after an untimed prefill."""
    with torch.inference_mode():
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        toks = [int(tok)]
        t0 = time.perf_counter()
        for _ in range(n):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            toks.append(int(tok))
        return n / (time.perf_counter() - t0), toks


def hf_prefill(model: Any, ids: list[int]) -> float:
    """Tokens/s of transformers' prefill, logits of the last position only (as ours)."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(torch.tensor([ids]), use_cache=True, logits_to_keep=1).logits.argmax(-1)
        return len(ids) / (time.perf_counter() - t0)


def matmul_floor(weights_t: list[torch.Tensor], n: int) -> float:
    """Tok/s of nothing but our decode's `matmul_t` calls on the same (in, out) tensors."""
    return _calls_per_second(weights_t, 0, matmul_t, n)


def naive_weights(md: ModelDir) -> list[torch.Tensor]:
    """The 2-D weights as stored in the shards, (out, in), one per projection, plus the head."""
    ws = [w for i in range(md.num_layers) for w in md.load_layer(i).values() if w.dim() == 2]
    stage = md.load_stage()
    return [*ws, stage.get("lm_head.weight", stage["embed_tokens.weight"])]


def naive_floor(weights: list[torch.Tensor], n: int) -> float:
    """Tok/s of `F.linear` on the stored (out, in) weights: q, k, v, o, gate, up, down, head."""
    return _calls_per_second(weights, 1, F.linear, n)


def _calls_per_second(
    weights: list[torch.Tensor],
    in_dim: int,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    n: int,
) -> float:
    """Rate of `n` rounds of `fn(x, w)` over every weight, `x` one row of width w.shape[in_dim]."""
    xs = {w.shape[in_dim]: torch.randn(1, w.shape[in_dim], dtype=w.dtype) for w in weights}
    calls = [(xs[w.shape[in_dim]], w) for w in weights]
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(n):
            for x, w in calls:
                fn(x, w)
        return n / (time.perf_counter() - t0)


def interleaved(
    runs: dict[str, Callable[[], float]], rounds: int, warmup: int, budget: float = float("inf")
) -> dict[str, Stats]:
    """Run each callable once per round, in turn (A B C A B C ...); rates after the warm-up.

    After MIN_ROUNDS timed rounds, no new round starts once `budget` seconds have passed: a
    loaded machine gets fewer rounds instead of a bench that never ends.
    """
    samples: dict[str, list[float]] = {k: [] for k in runs}
    t0 = time.monotonic()
    for r in range(warmup + rounds):
        if r >= warmup + MIN_ROUNDS and time.monotonic() - t0 > budget:
            break
        for name, fn in runs.items():
            rate = fn()
            if r >= warmup:
                samples[name].append(rate)
    return {k: Stats(tuple(v)) for k, v in samples.items()}


_RSS_CHILD = """
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
from bench.procs import proc_status
from bench.runtime import Ours, prompt_ids
from jarvis_mqtt.checkpoint import ModelDir
md = ModelDir.open(sys.argv[1])
loaded = Ours.load(md)
after_load = proc_status()
loaded.decode(prompt_ids(64, md.config["vocab_size"]), 8, "rss")
print(after_load["VmRSS"], *[proc_status()[k] for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")])
"""


def load_rss(md: ModelDir, threads: int) -> dict[str, int]:
    """Memory of a fresh process that loads the whole model and decodes a few tokens."""
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(md.path), str(threads)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,  # so the child imports this bench package
    )
    vals = [int(v) for v in out.stdout.split()[-5:]]
    return dict(zip(("after_load", "VmHWM", "VmRSS", "RssAnon", "RssFile"), vals, strict=True))


def _decode_figures(sec: Section, dec: dict[str, Stats], threads: int, suffix: str) -> None:
    """Rates (best and median) and the two judged ratios for one thread count."""
    setting = f"{threads} thread(s), {PROMPT_TOKENS}-token prompt, {DECODE_TOKENS} greedy tokens"
    rows = [
        ("decode_tok_s", "decode, ours", "ours", f"embed + 30 layers + head + argmax; {setting}"),
        (
            "transformers_decode_tok_s",
            "decode, transformers",
            "transformers",
            f"LlamaForCausalLM, sdpa, its DynamicCache, manual greedy loop; {setting}",
        ),
        (
            "matmul_floor_tok_s",
            "matmul floor (our calls)",
            "floor",
            "only our matmul_t calls, same (in,out) tensors: qkv, o, gate_up, down x30, lm_head",
        ),
        (
            "naive_floor_tok_s",
            "naive floor (F.linear as stored)",
            "naive_floor",
            "F.linear on the shards' (out,in) weights: q,k,v,o,gate,up,down x30, head",
        ),
    ]
    for key, label, name, how in rows:
        if name not in dec:
            continue
        st = dec[name]
        sec.add(
            Figure(
                key=key + suffix, label=f"{label}, {threads}t", value=round(st.best, 2),
                median=round(st.median, 2), unit="tok/s", how=how,
            )
        )  # fmt: skip
    o = dec["ours"]
    for key, label, den, target in (
        (
            "ratio_vs_transformers",
            "ours / transformers",
            dec["transformers"],
            TARGET_VS_TRANSFORMERS,
        ),
        ("ratio_vs_matmul_floor", "ours / matmul floor", dec["floor"], TARGET_VS_FLOOR),
    ):
        sec.add(
            Figure(
                key=key + suffix, label=f"{label}, {threads}t",
                value=round(o.best / den.best, 3), median=round(o.median / den.median, 3),
                target=target,
                inputs={"numerator_best": o.best, "denominator_best": den.best,
                        "numerator_median": o.median, "denominator_median": den.median},
                how="best ÷ best (median ÷ median), measured in the same interleaved rounds",
            )
        )  # fmt: skip
    if "naive_floor" in dec:
        nf = dec["naive_floor"]
        sec.add(
            Figure(
                key="ratio_vs_naive_floor" + suffix, label=f"ours / naive floor, {threads}t",
                value=round(o.best / nf.best, 3), median=round(o.median / nf.median, 3),
                inputs={"numerator_best": o.best, "denominator_best": nf.best},
                how="context only: F.linear on the layout as stored, no fusing or transposing",
            )
        )  # fmt: skip


def run(md: ModelDir, threads: int) -> Section:
    """Every runtime figure for one model, at `threads` torch threads (and at 1 for context)."""
    sec = Section("runtime")
    sec.context["machine_at_start"] = machine()
    vocab = md.config["vocab_size"]
    ids = prompt_ids(PROMPT_TOKENS, vocab)
    ours = Ours.load(md)
    hf = hf_model(md)
    fused = ours.matmul_calls()
    naive = naive_weights(md)
    seen: dict[str, list[int]] = {}

    def ours_run() -> float:
        rate, toks = ours.decode(ids, DECODE_TOKENS, "bench")
        seen.setdefault("ours", toks)
        return rate

    def hf_run() -> float:
        rate, toks = hf_decode(hf, ids, DECODE_TOKENS)
        seen.setdefault("transformers", toks)
        return rate

    runs: dict[str, Callable[[], float]] = {
        "ours": ours_run,
        "transformers": hf_run,
        "floor": lambda: matmul_floor(fused, DECODE_TOKENS),
        "naive_floor": lambda: naive_floor(naive, DECODE_TOKENS),
    }
    torch.set_num_threads(threads)
    dec = interleaved(runs, REPEATS, WARMUP, DECODE_BUDGET)
    long = prompt_ids(PREFILL_TOKENS, vocab, seed=1)
    pre = interleaved(
        {
            "ours": lambda: ours.prefill(long, "prefill"),
            "transformers": lambda: hf_prefill(hf, long),
        },
        PREFILL_REPEATS,
        WARMUP,
    )
    dec1: dict[str, Stats] = {}
    if threads != 1:
        torch.set_num_threads(1)
        del runs["naive_floor"]
        dec1 = interleaved(runs, ONE_THREAD_REPEATS, WARMUP, DECODE_BUDGET / 2)
        torch.set_num_threads(threads)
    agree = sum(a == b for a, b in zip(seen["ours"], seen["transformers"], strict=True))
    weights = md.shard_bytes(0, md.num_layers, include_stage=True)
    mem = load_rss(md, threads)
    base = baseline_rss("torch")

    _decode_figures(sec, dec, threads, "")
    sec.add(
        Figure(
            key="greedy_tokens_agree", label="greedy tokens: ours = transformers",
            value=f"{agree}/{len(seen['ours'])}",
            how="same prompt, first timed round: both run the same model",
        )
    )  # fmt: skip
    for key, label, st in (
        ("prefill_tok_s", "prefill, ours", pre["ours"]),
        ("transformers_prefill_tok_s", "prefill, transformers", pre["transformers"]),
    ):
        sec.add(
            Figure(
                key=key, label=f"{label}, {threads}t", value=round(st.best, 1),
                median=round(st.median, 1), unit="tok/s",
                how=f"{PREFILL_TOKENS}-token prompt, logits of the last position only; "
                f"{PREFILL_REPEATS} interleaved rounds",
            )
        )  # fmt: skip
    if dec1:
        _decode_figures(sec, dec1, 1, "_1t")
    sec.add(
        Figure(
            key="weight_bytes", label="weight bytes (30 layers + stage)", value=weights,
            unit="B", how=f"{mib(weights)} MiB: the files on disk, float32",
        )
    )  # fmt: skip
    sec.add(
        Figure(
            key="peak_rss_bytes", label="peak RSS, whole model in one process",
            value=mem["VmHWM"], unit="B",
            inputs={"ratio_to_weights": round(mem["VmHWM"] / weights, 3)},
            how=f"{mib(mem['VmHWM'])} MiB = {mem['VmHWM'] / weights:.2f}x the weights; VmHWM of "
            "a fresh process after load + 64-token prompt + 8 tokens",
        )
    )  # fmt: skip
    sec.add(
        rss_figure(
            "rss_after_decode_bytes", "RSS after decode (steady)", mem,
            "file-backed is the mapped shard files and libraries",
        )
    )  # fmt: skip
    sec.add(
        rss_figure(
            "baseline_rss_import_torch_bytes", "RSS of python + import torch", base,
            "a fresh interpreter, no weights",
        )
    )  # fmt: skip
    sec.context.update(
        model=md.name,
        threads=threads,
        decode_samples_tok_s={k: [round(x, 2) for x in v.samples] for k, v in dec.items()},
        decode_samples_1_thread_tok_s={
            k: [round(x, 2) for x in v.samples] for k, v in dec1.items()
        },
        prefill_samples_tok_s={k: [round(x, 1) for x in v.samples] for k, v in pre.items()},
        machine_at_end=machine(),
    )
    return sec
