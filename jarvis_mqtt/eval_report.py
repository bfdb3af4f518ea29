"""A sweep as the poster shows it: a markdown table, a heatmap, the "Hi!" replies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SAMPLE_CHARS = 120  # a reply longer than this is cut in the tables


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _delta(x: float | None, ref: float | None) -> str:
    return "–" if x is None or ref is None else f"{100 * (x - ref):+.1f}"


def _acc(row: dict[str, Any], fmt: str) -> float | None:
    part = row.get(fmt)
    return None if part is None else part.get("accuracy")


def one_line(text: str, limit: int = SAMPLE_CHARS) -> str:
    """A reply on one table row: newlines shown as ⏎, pipes escaped, long ones cut."""
    flat = text.replace("\n", " ⏎ ").replace("|", "\\|").strip()
    if not flat:
        return "*(nothing: the reply ended at once)*" if not text else "*(only blank space)*"
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def markdown(sweep: dict[str, Any]) -> str:
    """The sweep as a markdown page: settings, the table, the samples."""
    s = sweep["settings"]
    runs = sweep["runs"]
    intact = runs[0]
    formats = [f for f in ("letter", "cloze") if f in s["formats"]]
    poster = next((r["label"] for r in runs if r["kind"] == "poster"), None)
    where = f"; the `poster` row skips {{{poster}}}, the same relative depths" if poster else ""
    lines = [
        f"# Layer-skip sweep: {sweep['model']} ({sweep['num_layers']} layers)",
        "",
        f"MMLU, {s['questions']} questions ({s['per_subject']} per subject, {s['subjects']} "
        f"subjects, seed {s['seed']}), {s['shots']}-shot; chance is {_pct(s['chance'])} %, and "
        f"one question is {100 / max(1, s['questions']):.1f} points. "
        "Layers are numbered from 0 (the poster's 1-based {5,6,10,11,17,18} of Gemma 2B's 18 "
        f"layers is {{4,5,9,10,16,17}}{where}). "
        "Accuracy in % (Δ: points against intact); KL is the mean KL(intact ‖ skipped) "
        "in nats and agreement the share of positions whose top-1 token is the intact model's, "
        "over every position the scorer reads. Written by `jarvis eval sweep` on "
        f"{sweep.get('date')} in {sweep['seconds']['scoring']:.0f} s of scoring.",
        "",
    ]
    head = ["skip", "kind"]
    for f in formats:
        head += [f"{f} acc", "Δ"]
    head += ["KL", "agreement"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in runs:
        cells = [r["label"], r["kind"]]
        for f in formats:
            cells += [_pct(_acc(r, f)), _delta(_acc(r, f), _acc(intact, f))]
        cells += [f"{r['kl']:.3f}", f"{100 * r['agreement']:.1f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    if any("sample" in r for r in runs):
        how = "in the chat template" if s.get("sample_chat_template") else "as plain text"
        lines += [
            "",
            f'## "{s["sample_prompt"]}" under each skip set',
            "",
            f"Greedy, at most {s['sample_max_new_tokens']} tokens, the prompt {how}.",
            "",
            "| skip | reply |",
            "| --- | --- |",
        ]
        lines += [f"| {r['label']} | {one_line(r.get('sample', ''))} |" for r in runs]
    return "\n".join(lines) + "\n"


def heatmap(sweep: dict[str, Any], path: Path) -> None:
    """Layers on both axes, KL and accuracy drop as colour; per-layer curves beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm, TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    n = sweep["num_layers"]
    runs = sweep["runs"]
    intact = runs[0]
    fmt = "cloze" if intact.get("cloze") else sweep["settings"]["formats"][0]
    kl = np.full((n, n), np.nan)
    drop = np.full((n, n), np.nan)
    for r in runs:
        if r["kind"] in ("single", "pair"):
            i, j = r["skip"][0], r["skip"][-1]
            kl[i, j] = max(r["kl"], 1e-4)
            a, b = _acc(intact, fmt), _acc(r, fmt)
            drop[i, j] = np.nan if a is None or b is None else 100 * (a - b)
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.8), gridspec_kw={"width_ratios": [1, 1, 1.2]})
    grey = plt.get_cmap("magma").with_extremes(bad="#eeeeee")
    im = axes[0].imshow(kl, cmap=grey, norm=LogNorm(vmin=np.nanmin(kl), vmax=np.nanmax(kl)))
    fig.colorbar(im, ax=axes[0], label="KL(intact ‖ skipped), nats")
    axes[0].set_title("KL from the intact model")
    div = plt.get_cmap("RdBu_r").with_extremes(bad="#eeeeee")
    span = max(1.0, float(np.nanmax(np.abs(drop)))) if np.isfinite(drop).any() else 1.0
    im = axes[1].imshow(drop, cmap=div, norm=TwoSlopeNorm(0.0, -span, span))
    fig.colorbar(im, ax=axes[1], label=f"{fmt} accuracy drop, points")
    axes[1].set_title(f"MMLU {fmt} accuracy drop ({_pct(_acc(intact, fmt))} % intact)")
    for ax in axes[:2]:
        ax.set_xlabel("last skipped layer")
        ax.set_ylabel("first skipped layer")
        ticks = range(0, n, 1 if n <= 20 else 2)
        ax.set_xticks(list(ticks))
        ax.set_yticks(list(ticks))
    singles = sorted((r["skip"][0], r["kl"]) for r in runs if r["kind"] == "single")
    adjacent = sorted(
        (r["skip"][0] + 0.5, r["kl"])
        for r in runs
        if r["kind"] == "pair" and r["skip"][1] == r["skip"][0] + 1
    )
    ax = axes[2]
    ax.semilogy(*zip(*singles, strict=True), "o-", label="one layer skipped")
    if adjacent:
        ax.semilogy(*zip(*adjacent, strict=True), "s--", label="two adjacent layers skipped")
    for r in runs:
        if r["kind"] in ("poster", "cheapest-3", "cheapest-6", "chosen"):
            ax.axhline(r["kl"], ls=":", color="grey")
            ax.annotate(
                f"{r['kind']} {{{r['label']}}}",
                (0.99, r["kl"]),
                xycoords=("axes fraction", "data"),
                fontsize=8,
                ha="right",
                va="bottom",
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (pairs plotted between their two layers)")
    ax.set_ylabel("KL(intact ‖ skipped), nats")
    ax.set_title("per-layer criticality")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(
        f"{sweep['model']}: layer skipping on {sweep['settings']['questions']} MMLU questions "
        f"(layers from 0)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(sweep: dict[str, Any], out_dir: Path) -> list[Path]:
    """`skip-sweep-<model>.json`, `.md` and `.png` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"skip-sweep-{sweep['model']}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    paths[0].write_text(json.dumps(sweep, indent=1) + "\n")
    paths[1].write_text(markdown(sweep))
    heatmap(sweep, paths[2])
    return paths
