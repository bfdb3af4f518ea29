"""Runtime speed: our decode against transformers and against a matmul-only floor, one run.

Every figure comes from the same process, model, thread count and prompt, measured side by
side, so the ratios hold on any machine even when the absolute numbers do not.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.model import Segment
from jarvis_mqtt.runtime import LayerSpan, load_client_stages

PROMPT_TOKENS = 64
DECODE_TOKENS = 64
PREFILL_TOKENS = 256
REPEATS = 3


def _prompt(n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab, (n,), generator=g).tolist()


def ours_decode(md: ModelDir) -> tuple[float, float]:
    """(decode tok/s, prefill tok/s) of our runtime, greedy, best of REPEATS."""
    embed, head = load_client_stages(md)
    span = LayerSpan.load(md, 0, md.num_layers)
    ids = _prompt(PROMPT_TOKENS, md.config["vocab_size"])
    decode, prefill = [], []
    for r in range(REPEATS):
        sid = f"bench{r}"
        h = span(embed(torch.tensor(ids)), [Segment(sid, 0, len(ids))])
        tok = int(head(h[-1:]).argmax())
        t1 = time.perf_counter()
        for i in range(DECODE_TOKENS):
            h = span(embed(torch.tensor([tok])), [Segment(sid, len(ids) + i, 1)])
            tok = int(head(h).argmax())
        decode.append(DECODE_TOKENS / (time.perf_counter() - t1))
        span.free(sid)
        long = _prompt(PREFILL_TOKENS, md.config["vocab_size"])
        t2 = time.perf_counter()
        head(span(embed(torch.tensor(long)), [Segment("p", 0, len(long))])[-1:])
        prefill.append(PREFILL_TOKENS / (time.perf_counter() - t2))
        span.free("p")
    return max(decode), max(prefill)


def _hf_model(md: ModelDir) -> Any:
    import transformers

    cfg = transformers.AutoConfig.for_model(**md.config)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    sd = {f"model.{k}": v for k, v in md.load_stage().items() if k != "lm_head.weight"}
    stage = md.load_stage()
    sd["lm_head.weight"] = stage.get("lm_head.weight", stage["embed_tokens.weight"])
    for i in range(md.num_layers):
        sd.update({f"model.layers.{i}.{k}": v for k, v in md.load_layer(i).items()})
    model.load_state_dict(sd, assign=True, strict=False)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def transformers_decode(md: ModelDir) -> float:
    """Decode tok/s of Hugging Face transformers with its KV cache, greedy, best of REPEATS."""
    model = _hf_model(md)
    ids = torch.tensor([_prompt(PROMPT_TOKENS, md.config["vocab_size"])])
    rates = []
    with torch.inference_mode():
        for _ in range(REPEATS):
            out = model(ids, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(DECODE_TOKENS):
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            rates.append(DECODE_TOKENS / (time.perf_counter() - t0))
    return max(rates)


def matmul_floor(md: ModelDir) -> float:
    """Tokens/s of nothing but the model's matrix-vector products, weight shapes as stored."""
    weights = [w for i in range(md.num_layers) for w in md.load_layer(i).values() if w.dim() == 2]
    stage = md.load_stage()
    weights.append(stage.get("lm_head.weight", stage["embed_tokens.weight"]))
    rates = []
    with torch.inference_mode():
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for _ in range(DECODE_TOKENS):
                for w in weights:
                    F.linear(torch.randn(1, w.shape[1]), w)
            rates.append(DECODE_TOKENS / (time.perf_counter() - t0))
    return max(rates)


_RSS_CHILD = """
import resource, sys, torch
from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.model import Segment
from jarvis_mqtt.runtime import LayerSpan, load_client_stages
md = ModelDir.open(sys.argv[1])
embed, head = load_client_stages(md)
span = LayerSpan.load(md, 0, md.num_layers)
h = span(embed(torch.arange(100, 164)), [Segment("s", 0, 64)])
head(h[-1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_rss(md: ModelDir) -> int:
    """Peak RSS in bytes of a fresh process that loads the whole model and runs a prompt."""
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(md.path)], check=True, capture_output=True, text=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def run(md: ModelDir, threads: int) -> dict[str, Any]:
    """All runtime figures for one model."""
    torch.set_num_threads(threads)
    ours, prefill = ours_decode(md)
    hf = transformers_decode(md)
    floor = matmul_floor(md)
    weights = sum(f["bytes"] for f in md.manifest["files"].values())
    rss = peak_rss(md)
    return {
        "model": md.name,
        "threads": threads,
        "decode_tok_s": round(ours, 2),
        "transformers_decode_tok_s": round(hf, 2),
        "matmul_floor_tok_s": round(floor, 2),
        "ratio_vs_transformers": round(ours / hf, 3),
        "target_ratio_vs_transformers": 1.25,
        "ratio_vs_matmul_floor": round(ours / floor, 3),
        "target_ratio_vs_matmul_floor": 0.85,
        "prefill_tok_s": round(prefill, 1),
        "peak_rss_bytes": rss,
        "weight_bytes": weights,
        "note": (
            f"best of {REPEATS} runs each, {PROMPT_TOKENS}-token prompt, {DECODE_TOKENS} decoded"
        ),
    }
