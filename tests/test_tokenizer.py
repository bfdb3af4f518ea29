"""Tokenizers built from GGUF metadata against transformers' own, chat templates, streaming."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.errors import ConfigError, JarvisError
from jarvis_mqtt.tokenizer import (
    GEMMA_CHAT_TEMPLATE,
    StreamDecoder,
    Tokenizer,
    build_gguf_tokenizer,
    derive_merges,
)

TEXTS = [
    "Hello world",
    "  leading spaces, inner   runs\tand\ttabs\n\nnew lines\n",
    "1234567890 3.14159 -42 1e-9 2024-06-01",
    "naïve café Straße 日本語のテキスト 中文 한국어 Ελληνικά русский",
    "emoji 🤖🎉👍🏽 and a flag 🇫🇷",
    "def f(x):\n    return {'a': x**2}  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<bos>x<eos>",
    "",
    " ",
    "\u00a0non-breaking\u200bzero-width",
    "xyz" * 50,
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "  What is 2+2?  "},
    ],
]


# -- without real weights ------------------------------------------------------------------------


def _tiny_byte_level(**meta: Any) -> Tokenizer:
    """A byte-level vocabulary of the 256 byte letters, a few merges and three control tokens."""
    from jarvis_mqtt.tokenizer import _byte_alphabet

    letters = list(_byte_alphabet().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *letters, "he", "ll", "hell", "hello"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    base = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["h e", "l l", "he ll", "hell o"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}",
    }
    return Tokenizer.from_gguf_metadata({**base, **meta})


def test_byte_level_from_metadata() -> None:
    tok = _tiny_byte_level()
    ids = tok.encode("hello<|im_end|>")
    assert ids == [tok.backend.token_to_id("hello"), 2]  # merged, and the control token whole
    assert (
        tok.decode(ids) == "hello"
        and tok.decode(ids, skip_special_tokens=False) == "hello<|im_end|>"
    )
    assert tok.eos_token_ids == {2} and tok.bos_token_id == 1 and not tok.add_bos_token
    with_bos = _tiny_byte_level(**{"tokenizer.ggml.add_bos_token": True})
    assert with_bos.encode("hello") == [1, *ids[:1]]
    assert with_bos.encode("hello", add_special_tokens=False) == ids[:1]


def test_stream_decoder_holds_back_partial_characters() -> None:
    tok = _tiny_byte_level()
    ids = tok.encode("hé🤖!")  # é is two byte tokens, the robot four
    stream = StreamDecoder(tok)
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) + stream.flush() == "hé🤖!"
    assert deltas.count("") >= 4 and not any("\ufffd" in d for d in deltas)
    cut = StreamDecoder(tok)
    for i in tok.encode("🤖")[:2]:
        assert cut.push(i) == ""
    assert cut.flush() == "\ufffd"  # what is held back is given up at the end, not lost silently


def test_derive_merges_orders_by_score_then_longer_left_piece() -> None:
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    scores = {"a": 0.0, "b": 0.0, "c": 0.0, "ab": -1.0, "bc": -2.0, "abc": -3.0}
    assert derive_merges(vocab, scores) == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]


def test_chat_template_environment() -> None:
    tok = _tiny_byte_level()
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "<|im_start|>user\nhi<|im_end|>\n"
    tok.chat_template = (
        "{% for m in messages %}\n  {% generation %}{{ m | tojson }}{% endgeneration %}\n"
        "{% endfor %}{{ bos_token }}{% if add_generation_prompt %}>{% endif %}"
    )
    # trim_blocks/lstrip_blocks drop the block lines; tojson keeps <, > and non-ASCII unescaped.
    out = tok.apply_chat_template([{"role": "user", "content": "<é>"}])
    assert out == '{"role": "user", "content": "<é>"}<|im_start|>>'
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(JarvisError, match="roles must alternate"):
        tok.apply_chat_template(msgs)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        tok.apply_chat_template(msgs)


def test_gemma_template_folds_system_into_first_turn() -> None:
    tok = _tiny_byte_level(**{"tokenizer.chat_template": GEMMA_CHAT_TEMPLATE})
    tok.config["bos_token"] = "<bos>"
    assert tok.apply_chat_template(CONVERSATIONS[1]) == (
        "<bos><start_of_turn>user\nYou answer in one word.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
    )
    with pytest.raises(JarvisError, match="alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_add_bos_inferred_from_post_processor(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    backend = Backend(models.WordLevel({"<s>": 0, "a": 1, "</s>": 2}, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 0)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    tok = Tokenizer.from_model_dir(tmp_path)
    assert tok.add_bos_token and tok.encode("a a") == [0, 1, 1]  # one BOS, not two
    assert tok.eos_token_ids == {2}


# -- the packaged real models against transformers ----------------------------------------------


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def pair(request: pytest.FixtureRequest, hf_gguf_tokenizer: Any) -> tuple[str, Tokenizer, Any]:
    """(model, our tokenizer, transformers' tokenizer read from the same GGUF)."""
    md: ModelDir = request.getfixturevalue(f"{request.param}_dir")
    return request.param, md.tokenizer(), hf_gguf_tokenizer(md)


@pytest.mark.slow
def test_ids_match_transformers(pair: tuple[str, Tokenizer, Any]) -> None:
    _, ours, ref = pair
    for text in TEXTS:
        assert ours.encode(text) == ref(text).input_ids, text
        assert (
            ours.encode(text, add_special_tokens=False)
            == ref(text, add_special_tokens=False).input_ids
        )


@pytest.mark.slow
def test_decode_round_trips(pair: tuple[str, Tokenizer, Any]) -> None:
    _, ours, ref = pair
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_special_tokens(pair: tuple[str, Tokenizer, Any]) -> None:
    name, ours, _ = pair
    if name == "smollm2":
        assert (ours.bos_token_id, ours.eos_token_ids, ours.add_bos_token) == (1, {2}, False)
        assert ours.encode("<|im_start|>") == [1]
    else:
        assert (ours.bos_token_id, ours.eos_token_ids, ours.add_bos_token) == (2, {1, 106}, True)
        assert ours.encode("<end_of_turn>", add_special_tokens=False) == [106]


@pytest.mark.slow
def test_chat_template(pair: tuple[str, Tokenizer, Any]) -> None:
    name, ours, ref = pair
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            text = ours.apply_chat_template(msgs, add_generation_prompt=gen)
            if name == "smollm2":
                expected = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
                assert text == expected
            else:  # the Gemma 3 GGUF has no template: ours is Gemma's standard one
                assert text.startswith("<bos><start_of_turn>user\n")
                assert text.endswith("<start_of_turn>model\n" if gen else "<end_of_turn>\n")


@pytest.mark.slow
def test_stream_decoder_on_real_vocabularies(pair: tuple[str, Tokenizer, Any]) -> None:
    _, ours, _ = pair
    text = "Zürich → 東京 🤖🎉 𓀀 ok"  # the hieroglyph is byte tokens in both vocabularies
    ids = ours.encode(text, add_special_tokens=False)
    stream = StreamDecoder(ours)
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) + stream.flush() == text
    assert "" in deltas and not any("\ufffd" in d for d in deltas)


def test_unsupported_gguf_tokenizer() -> None:
    with pytest.raises(ConfigError, match="bert"):
        build_gguf_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
