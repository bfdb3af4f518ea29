"""The runtime on the packaged real weights against transformers' own GGUF loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.generate import LocalModel
from jarvis_mqtt.model import Segment
from jarvis_mqtt.runtime import LayerSpan, load_client_stages
from jarvis_mqtt.sampling import SamplingParams

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

# SmolLM2 is the instruction-tuned model and answers a chat; the packaged Gemma 3 270M is the
# pretrained base model, which continues text (a chat template only confuses it).
PROMPTS = {
    "smollm2": ("What is the capital of France?", True, "Paris"),
    "gemma3": ("Paris is the capital of", False, "France"),
}


def prompt_ids(md: ModelDir, family: str) -> tuple[list[int], str]:
    """Token ids of the family's prompt, and a word a correct model says in reply."""
    text, chat, expect = PROMPTS[family]
    tok = md.tokenizer()
    if chat:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), False)
    else:
        ids = tok.encode(text)
    return list(ids), expect


def _hf_reference(md: ModelDir) -> Any:
    """transformers' model from the same GGUF file our importer read (its own dequantizer)."""
    p = Path(md.manifest["source"]["path"])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        p.parent, gguf_file=p.name, torch_dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(request: pytest.FixtureRequest) -> tuple[Any, ModelDir, str]:
    md: ModelDir = request.getfixturevalue(f"{request.param}_dir")
    return _hf_reference(md), md, request.param


def test_logits_match_transformers(real: tuple[Any, ModelDir, str]) -> None:
    model, md, family = real
    ids, _ = prompt_ids(md, family)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    embed, head = load_client_stages(md)
    span = LayerSpan.load(md, 0, md.num_layers)
    ours = head(span(embed(torch.tensor(ids)), [Segment("s", 0, len(ids))]))
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)


def test_greedy_32_tokens_identical_and_sensible(real: tuple[Any, ModelDir, str]) -> None:
    model, md, family = real
    ids, expect = prompt_ids(md, family)
    local = LocalModel(md)
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([ids]),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=sorted(local.tokenizer.eos_token_ids),
        )[0, len(ids) :].tolist()
    ours = [e.token_id for e in local.generate(ids, SamplingParams(max_new_tokens=32))]
    assert ours == ref
    # The importer undid llama.cpp's Q/K permutation (and Gemma's norm offset): the answer is
    # right, not merely equal to a reference that read the same file.
    assert expect in local.tokenizer.decode(ours)
