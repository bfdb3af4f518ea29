"""Figures of a bench section: values with units, targets and how each was measured.

A `Figure` is one number; when it has a target it is judged (met or missed), and a ratio keeps
the two measurements it divides next to it, so the JSON shows both sides of every comparison.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Figure:
    """One measured number, optionally with a target it must reach."""

    key: str  # JSON key, snake_case
    label: str  # what the table shows
    value: float | int | str | bool  # for repeated measurements, the best of them
    median: float | None = None  # for repeated measurements, their median
    unit: str = ""
    target: float | None = None
    op: str = ">="  # how value compares to target: ">=" or "<="
    how: str = ""  # one line: how it was measured
    inputs: Mapping[str, float] = field(default_factory=dict)  # the sides of a ratio

    @property
    def met(self) -> bool | None:
        """Whether the value (the best-of) meets the target; None when there is none."""
        return self._meets(self.value)

    @property
    def median_met(self) -> bool | None:
        """Whether the median meets the target too; None without a target or a median."""
        return None if self.median is None else self._meets(self.median)

    def _meets(self, v: object) -> bool | None:
        if self.target is None or not isinstance(v, int | float) or isinstance(v, bool):
            return None
        return v >= self.target if self.op == ">=" else v <= self.target

    def to_json(self) -> dict[str, Any]:
        """The JSON form: value, unit, target, met, inputs, how."""
        out: dict[str, Any] = {"value": self.value}
        if self.median is not None:
            out["median"] = self.median
        if self.unit:
            out["unit"] = self.unit
        if self.target is not None:
            out.update(target=self.target, op=self.op, met=self.met)
            if self.median is not None:
                out["median_met"] = self.median_met
        if self.inputs:
            out["inputs"] = dict(self.inputs)
        if self.how:
            out["how"] = self.how
        return out


@dataclass
class Section:
    """Every figure of one section, plus free-form context (settings, machine state)."""

    name: str
    figures: list[Figure] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)

    def add(self, figure: Figure) -> Figure:
        """Append and return a figure."""
        self.figures.append(figure)
        return figure

    def misses(self) -> list[Figure]:
        """Figures that missed their target."""
        return [f for f in self.figures if f.met is False]

    def to_json(self) -> dict[str, Any]:
        """The section as written to results.json."""
        return {
            "context": self.context,
            "figures": {f.key: f.to_json() for f in self.figures},
            "misses": [f.key for f in self.misses()],
        }


@dataclass(frozen=True)
class Stats:
    """Best-of and median of repeated rate measurements (higher is better)."""

    samples: tuple[float, ...]

    @property
    def best(self) -> float:
        return max(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation, as numpy's default."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _fmt(value: float | int | str | bool, unit: str) -> str:
    if isinstance(value, bool | str):
        text = str(value)
    elif isinstance(value, int):
        text = f"{value:,}"
    elif abs(value) >= 100:
        text = f"{value:,.1f}"
    else:
        text = f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return f"{text} {unit}".strip()


def print_section(section: Section) -> None:
    """A rich table: figure, measured (best-of), median, target, status, how."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"bench: {section.name}", show_lines=False, expand=False)
    t.add_column("figure")
    t.add_column("measured (best)", justify="right")
    t.add_column("median", justify="right")
    t.add_column("target", justify="right")
    t.add_column("status")
    t.add_column("how", overflow="fold", max_width=70)
    for f in section.figures:
        target = "" if f.target is None else f"{f.op} {_fmt(f.target, '')}"
        status = {True: "[green]met[/green]", False: "[bold red]MISS[/bold red]", None: ""}[f.met]
        value = _fmt(f.value, f.unit)
        if f.met is False:
            value = f"[bold red]{value}[/bold red]"
        median = "" if f.median is None else _fmt(f.median, f.unit)
        if f.median_met is False:
            median = f"[red]{median}[/red]"
        t.add_row(f.label, value, median, target, status, f.how)
    console = Console(width=max(160, Console().width))
    console.print(t)
    for k, v in section.context.items():
        console.print(f"  [dim]{k}: {v}[/dim]")
