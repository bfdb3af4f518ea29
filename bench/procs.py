"""Process memory and machine state, read from /proc, for the memory figures and the context."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.report import Figure

_BASELINE_CHILD = """
import sys
for name in sys.argv[1:]:
    __import__(name)
print(open("/proc/self/status").read())
"""


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """Memory lines of /proc/PID/status in bytes: VmRSS, VmHWM, RssAnon, RssFile, RssShmem."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) * 1024  # the kernel reports kB
    return out


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds a process has used so far (/proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each named process, and the wall clock under the key "wall"."""
    out = {name: cpu_seconds(pid) for name, pid in pids.items()}
    out["wall"] = time.monotonic()
    return out


def _parse_status(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def baseline_rss(*modules: str) -> dict[str, int]:
    """/proc status memory of a fresh interpreter that only imports `modules`."""
    out = subprocess.run(
        [sys.executable, "-c", _BASELINE_CHILD, *modules],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return _parse_status(out.stdout)


def machine() -> dict[str, Any]:
    """What the figures depend on: cores, load, versions."""
    import torch

    return {
        "cpus": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }


def mib(n: float) -> float:
    """Bytes to MiB, one decimal."""
    return round(n / (1 << 20), 1)


def rss_figure(key: str, label: str, status: dict[str, int], what: str) -> Figure:
    """A process's resident memory (VmRSS from `status`), split into anonymous and file-backed."""
    return Figure(
        key=key, label=label, value=status["VmRSS"], unit="B",
        inputs={"RssAnon": status["RssAnon"], "RssFile": status["RssFile"]},
        how=f"{mib(status['VmRSS'])} MiB (anon {mib(status['RssAnon'])}, file "
        f"{mib(status['RssFile'])}): {what}",
    )  # fmt: skip
