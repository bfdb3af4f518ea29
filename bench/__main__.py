"""`make bench`: every figure measured side by side in one run; a table and bench/results.json."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results.json")


def _table(section: str, figures: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=section)
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in figures.items():
        t.add_row(k, str(v))
    Console().print(t)


def main() -> None:
    """Run the selected sections and merge their figures into bench/results.json."""
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--only", action="append", help="section(s) to run: runtime, pipeline")
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    a = p.parse_args()
    from jarvis_mqtt.importers import import_default

    md = import_default(progress=False)
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    sections = a.only or ["runtime"]
    if "runtime" in sections:
        from bench import runtime

        results["runtime"] = runtime.run(md, a.threads)
        _table("runtime", results["runtime"])
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
