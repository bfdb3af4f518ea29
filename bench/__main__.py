"""`make bench`: every figure measured side by side in one run; tables and bench/results.json.

Sections: `runtime` (our single-process decode against transformers and a matmul floor, and
memory), `pipeline` (the MQTT mesh against a single process, per-hop latency, concurrent
sessions, node memory) and `resilience` (stall per failure kind, four meshes). `--only
SECTION` runs one; sections not run keep their last results in the JSON, and each section is
stamped with the time it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.report import Figure, Section, print_section

RESULTS = Path(__file__).with_name("results.json")
SECTIONS = ("runtime", "pipeline", "resilience")  # the default run: every section
OPTIONAL: tuple[str, ...] = ()


def resilience_section(flat: dict[str, Any]) -> Section:
    """bench/resilience.py's flat `kind.figure` dict as figures; each stall judged."""
    sec = Section("resilience")
    for key, value in flat.items():
        if key.endswith(".target_stall_s"):
            continue
        target = flat.get(key.replace(".stall_s", ".target_stall_s"))
        judged = key.endswith(".stall_s") and isinstance(target, int | float)
        sec.add(
            Figure(
                key=key, label=key, value=value if isinstance(value, int | float | str) else
                str(value), unit="s" if key.endswith("_s") else "",
                target=float(target) if judged and target is not None else None, op="<=",
            )
        )  # fmt: skip
    return sec


def run_section(name: str, a: argparse.Namespace) -> Section:
    """Import the model (kept if already imported) and run one section."""
    from jarvis_mqtt.importers import import_default

    md = import_default(progress=False)
    if name == "runtime":
        from bench import runtime

        return runtime.run(md, a.threads)
    if name == "resilience":
        from bench import resilience

        return resilience_section(resilience.run(md, md.path.parent))
    from bench import pipeline

    return pipeline.run(md)


def main() -> int:
    """Run the selected sections, print their tables, merge their figures into results.json."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--only", choices=SECTIONS + OPTIONAL, action="append", help="run only this section"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads of the runtime section (default: every core)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON file to merge results into")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    a = p.parse_args()
    # SIGTERM unwinds like Ctrl-C, so every `finally` stops the processes a section started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        results: dict[str, Any] = json.loads(a.out.read_text()) if a.out.exists() else {}
    except json.JSONDecodeError:
        results = {}
    misses: list[str] = []
    for name in a.only or SECTIONS:
        t0 = time.monotonic()
        sec = run_section(name, a)
        sec.context["seconds"] = round(time.monotonic() - t0, 1)
        sec.context["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        print_section(sec)
        results[name] = sec.to_json()
        misses += [f"{name}.{f.key}" for f in sec.misses()]
        # Written after every section so a later failure keeps what was measured.
        a.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {a.out}")
    if misses:
        print(f"missed targets: {', '.join(misses)}", file=sys.stderr)
    return 1 if misses and a.strict else 0


if __name__ == "__main__":
    sys.exit(main())
