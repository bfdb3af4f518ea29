"""The layer-skip sweep: which layers the model can lose, and the criticality profile from it.

A sweep scores, on one fixed stratified MMLU sample, the intact model, every single-layer skip,
every pair of adjacent layers, the JARVIS poster's six-layer skip and, in a second pass, the
layers that the singles found cheapest to lose taken together. Each skip set also answers
"Hi!" greedily, as the poster shows.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jarvis_mqtt.eval_data import CHANCE, Bank, build_item
from jarvis_mqtt.eval_engine import INTACT, Evaluator, Skip, Tracker
from jarvis_mqtt.eval_scores import score_mmlu
from jarvis_mqtt.evaluate import CRITICALITY_FILE

if TYPE_CHECKING:
    from jarvis_mqtt.checkpoint import ModelDir

POSTER_SKIP = (4, 5, 9, 10, 16, 17)  # the poster's {5,6,10,11,17,18}, 1-based, of 18 layers
POSTER_LAYERS = 18
CHEAPEST = (3, 6)  # sizes of the "cheapest layers together" sets of the second pass
HI = "Hi!"
ACC_FORMAT = "cloze"  # the format above chance at this size; acc_drop in criticality uses it
# never_skip: a single skip whose KL is this many times the median single skip is an outlier...
NEVER_SKIP_FACTOR = 4.0
NEVER_SKIP_MIN_KL = 0.5  # ...and must cost at least this much (nats per position) to count


def poster_skip(n: int) -> Skip:
    """The poster's three adjacent pairs at the same relative depths in an `n`-layer model."""
    if n == POSTER_LAYERS:
        return frozenset(POSTER_SKIP)
    starts = [round(p * (n - 2) / (POSTER_LAYERS - 2)) for p in POSTER_SKIP[::2]]
    return frozenset(x for s in starts for x in (s, s + 1))


def sweep_sets(n: int, all_pairs: bool = False) -> list[tuple[str, str, Skip]]:
    """(label, kind, skip) of the first pass: intact, singles, adjacent (or all) pairs, poster."""
    out = [("intact", "intact", INTACT)]
    out += [(f"{i}", "single", frozenset({i})) for i in range(n)]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if all_pairs or j == i + 1]
    out += [(f"{i},{j}", "pair", frozenset({i, j})) for i, j in pairs]
    poster = poster_skip(n)
    if len(poster) == len(POSTER_SKIP):
        out.append((label(poster), "poster", poster))
    return out


def label(skip: Skip) -> str:
    """ "4,5,9" for a skip set; "intact" for none."""
    return ",".join(str(i) for i in sorted(skip)) or "intact"


def is_instruct(md: ModelDir) -> bool:
    """Whether the model was tuned to chat (its source names it Instruct / -it / chat)."""
    source = md.manifest.get("source", {})
    text = f"{md.name} {source.get('path', '')} {source.get('name', '')}".lower()
    return bool(re.search(r"instruct|chat|[-_.]it\b", text))


def hi_prompt(ev: Evaluator, chat: bool) -> list[int]:
    """Token ids of "Hi!": in the chat template for an instruction-tuned model, else plain."""
    tok = ev.tokenizer
    if chat:
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": HI}]), False)
    return tok.encode(HI)


def run_sweep(
    ev: Evaluator,
    bank: Bank,
    *,
    per_subject: int = 1,
    limit: int | None = None,
    shots: int = 0,
    formats: Sequence[str] = ("letter", "cloze"),
    subjects: Sequence[str] | None = None,
    all_pairs: bool = False,
    extra: Sequence[Skip] = (),
    chat: bool | None = None,
    max_new_tokens: int = 24,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Run the sweep; return its JSON (settings, one row per skip set, timings)."""
    t0 = time.perf_counter()
    n = ev.num_layers
    questions = bank.sample(subjects, per_subject=per_subject, limit=limit)
    items = [
        build_item(ev.tokenizer, bank, q, f, shots, ev.max_len) for q in questions for f in formats
    ]
    sets = sweep_sets(n, all_pairs)
    sets += [(label(s), "chosen", s) for s in extra if s not in {x for _, _, x in sets}]
    scored = score_mmlu(ev, items, [s for _, _, s in sets], tracker)
    rows = [{"label": lb, "kind": kind, "skip": sorted(s), **scored[s]} for lb, kind, s in sets]
    singles = {r["skip"][0]: r for r in rows if r["kind"] == "single"}
    by_kl = sorted(singles, key=lambda i: (singles[i]["kl"], i))
    cheapest = []
    for k in CHEAPEST:
        s = frozenset(by_kl[:k])
        if k < n and s not in scored:
            cheapest.append((label(s), f"cheapest-{k}", s))
    if cheapest:
        second = score_mmlu(ev, items, [s for _, _, s in cheapest], tracker)
        rows += [
            {"label": lb, "kind": kind, "skip": sorted(s), **second[s]} for lb, kind, s in cheapest
        ]
    t1 = time.perf_counter()
    chat = is_instruct(ev.model_dir) if chat is None else chat
    prompt = hi_prompt(ev, chat)
    if tracker is not None and max_new_tokens:
        tracker.start(len(rows), f'"{HI}" samples')
    for r in rows:
        if max_new_tokens:
            r["sample"] = ev.generate(prompt, frozenset(r["skip"]), max_new_tokens)
            if tracker is not None:
                tracker.advance()
    md = ev.model_dir
    return {
        "model": md.name,
        "family": md.family,
        "num_layers": n,
        "source": md.manifest.get("source", {}),
        "settings": {
            "questions": len(questions),
            "per_subject": per_subject,
            "limit": limit,
            "subjects": len({q.subject for q in questions}),
            "shots": shots,
            "formats": list(formats),
            "seed": bank.seed,
            "chance": CHANCE,
            "layers": "0-based",
            "kl": "mean KL(intact || skipped) per scored position, nats",
            "sample_prompt": HI,
            "sample_chat_template": chat,
            "sample_max_new_tokens": max_new_tokens,
        },
        "seconds": {"scoring": round(t1 - t0, 1), "samples": round(time.perf_counter() - t1, 1)},
        "date": time.strftime("%Y-%m-%d"),
        "runs": rows,
    }


def _acc(row: dict[str, Any], fmt: str) -> float | None:
    part = row.get(fmt)
    return None if part is None else part.get("accuracy")


def criticality(sweep: dict[str, Any], sweep_file: str | None = None) -> dict[str, Any]:
    """The per-layer profile a placement planner reads, from a sweep's single skips."""
    runs = sweep["runs"]
    intact = next(r for r in runs if r["kind"] == "intact")
    fmt = ACC_FORMAT if intact.get(ACC_FORMAT) else sweep["settings"]["formats"][0]
    other = next((f for f in ("letter", "cloze") if f != fmt and intact.get(f)), None)
    layers: dict[str, dict[str, float | None]] = {}
    for r in runs:
        if r["kind"] != "single":
            continue
        entry = {"acc_drop": _drop(intact, r, fmt), "kl": r["kl"], "agreement": r["agreement"]}
        if other:
            entry[f"acc_drop_{other}"] = _drop(intact, r, other)
        layers[str(r["skip"][0])] = entry
    kls = [float(v["kl"] or 0.0) for v in layers.values()]
    median = statistics.median(kls) if kls else 0.0
    cut = max(NEVER_SKIP_MIN_KL, NEVER_SKIP_FACTOR * median)
    never = sorted(int(i) for i, v in layers.items() if float(v["kl"] or 0.0) >= cut)
    rule = (
        f"a layer is never-skip when skipping it alone costs a KL of at least "
        f"max({NEVER_SKIP_MIN_KL}, {NEVER_SKIP_FACTOR} x median single-skip KL) = {cut:.3f} "
        f"nats per position: an outlier among the layers, and a large loss in itself"
    )
    s = sweep["settings"]
    return {
        "model": sweep["model"],
        "metric": "kl",
        "layers": layers,
        "never_skip": never,
        "rule": rule,
        "source": {
            "sweep": sweep_file,
            "date": sweep.get("date"),
            "questions": s["questions"],
            "shots": s["shots"],
            "seed": s["seed"],
            "acc_drop": f"intact minus skipped MMLU accuracy, {fmt} format",
            "kl": s["kl"],
            "agreement": "share of scored positions whose top-1 token matches the intact model",
            "median_single_kl": median,
        },
    }


def _drop(intact: dict[str, Any], row: dict[str, Any], fmt: str) -> float | None:
    a, b = _acc(intact, fmt), _acc(row, fmt)
    return None if a is None or b is None else a - b


def write_criticality(md: ModelDir, profile: dict[str, Any]) -> Path:
    """Write `criticality.json` into the model directory (atomically)."""
    path = md.path / CRITICALITY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(profile, indent=2) + "\n")
    tmp.replace(path)
    return path
