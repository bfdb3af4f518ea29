"""The model directory format: round trips, streaming, and every way a directory can be broken."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from jarvis_mqtt.checkpoint import (
    ModelDir,
    layer_tensor_names,
    list_models,
    models_root,
    write_model_dir,
)
from jarvis_mqtt.errors import CheckpointError, ConfigError

HIDDEN, INTER, VOCAB, LAYERS = 16, 32, 50, 3
TOKENIZER_JSON = json.dumps(
    {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "WordLevel",
            "vocab": {f"t{i}": i for i in range(VOCAB)},
            "unk_token": "t0",
        },
    }
)


def _config(family: str = "llama", **kw: Any) -> dict[str, Any]:
    model_type = {"gemma3": "gemma3_text"}.get(family, family)
    return {
        "model_type": model_type,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 4,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
        **kw,
    }


def _shape(key: str) -> tuple[int, ...]:
    shapes = {
        "q_proj.weight": (16, HIDDEN),
        "k_proj.weight": (8, HIDDEN),
        "v_proj.weight": (8, HIDDEN),
        "o_proj.weight": (HIDDEN, 16),
        "q_proj.bias": (16,),
        "k_proj.bias": (8,),
        "v_proj.bias": (8,),
        "q_norm.weight": (4,),
        "k_norm.weight": (4,),
        "gate_proj.weight": (INTER, HIDDEN),
        "up_proj.weight": (INTER, HIDDEN),
        "down_proj.weight": (HIDDEN, INTER),
    }
    return shapes.get(".".join(key.split(".")[-2:]), (HIDDEN,))


def _tensors(family: str, config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g),
        "model.norm.weight": torch.randn(HIDDEN, generator=g),
        "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g),
    }
    for i in range(LAYERS):
        for key in sorted(layer_tensor_names(family, config)):
            out[f"model.layers.{i}.{key}"] = torch.randn(_shape(key), generator=g)
    return out


def _write(
    out: Path,
    family: str = "llama",
    tensors: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    **config_kw: Any,
) -> ModelDir:
    config = _config(family, **config_kw)
    tensors = _tensors(family, config) if tensors is None else tensors
    write_model_dir(
        out,
        name=out.name,
        family=family,
        config=config,
        tensors=iter(tensors.items()),
        tokenizer_json=TOKENIZER_JSON,
        tokenizer_config={"eos_token": "t1", "add_bos_token": False},
        dtype=dtype,
        source={"kind": "test"},
    )
    return ModelDir.open(out)


@pytest.fixture
def model(tmp_path: Path) -> tuple[ModelDir, dict[str, torch.Tensor]]:
    tensors = _tensors("llama", _config())
    return _write(tmp_path / "tiny", tensors=tensors), tensors


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gemma3"])
def test_round_trip_every_family(tmp_path: Path, family: str) -> None:
    config = _config(family)
    tensors = _tensors(family, config)
    md = _write(tmp_path / family, family, tensors)
    assert (md.family, md.num_layers, md.dtype) == (family, LAYERS, torch.float32)
    for i in range(LAYERS):
        layer = md.load_layer(i)
        prefix = f"model.layers.{i}."
        expected = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        assert layer.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.equal(layer[k], v), k
    stage = md.load_stage()
    assert torch.equal(stage["embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert torch.equal(stage["lm_head.weight"], tensors["lm_head.weight"])
    assert json.loads((md.path / "config.json").read_text()) == md.config
    assert md.tokenizer().encode("t3 t4") == [3, 4]


def test_manifest_lists_every_file_with_hash_and_size(model: tuple[ModelDir, Any]) -> None:
    md, _ = model
    m = md.manifest
    assert m["format"] == 1 and m["stage_file"] == "stage.safetensors"
    assert m["layers"] == {
        "0": "layer_000.safetensors",
        "1": "layer_001.safetensors",
        "2": "layer_002.safetensors",
    }
    on_disk = {p.name for p in md.path.iterdir()} - {"manifest.json"}
    assert set(m["files"]) == on_disk
    for name, entry in m["files"].items():
        assert entry["bytes"] == (md.path / name).stat().st_size
    assert md.layer_files(1, 3) == ["layer_001.safetensors", "layer_002.safetensors"]
    layers = sum(m["files"][f]["bytes"] for f in md.layer_files(0, 2))
    assert md.shard_bytes(0, 2, include_stage=False) == layers
    stage = m["files"]["stage.safetensors"]["bytes"]
    assert md.shard_bytes(0, 2, include_stage=True) == layers + stage


def test_tied_head_is_dropped_only_when_equal(tmp_path: Path) -> None:
    tensors = _tensors("llama", _config())
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    md = _write(tmp_path / "tied", tensors=tensors, tie_word_embeddings=True)
    assert set(md.load_stage()) == {"embed_tokens.weight", "norm.weight"}
    untied = _write(tmp_path / "untied", tensors=tensors)  # same values, config not tied
    assert "lm_head.weight" in untied.load_stage()
    del tensors["lm_head.weight"]
    with pytest.raises(CheckpointError, match="lm_head"):
        _write(tmp_path / "headless", tensors=tensors)


def test_dtype_cast(tmp_path: Path) -> None:
    md = _write(tmp_path / "bf16", dtype=torch.bfloat16)
    assert md.dtype == torch.bfloat16 and md.manifest["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in md.load_layer(0).values())


def test_layers_are_written_while_streaming(tmp_path: Path) -> None:
    """Layer 0 is on disk before layer 2 is read: memory holds about one layer."""
    tensors = _tensors("llama", _config())

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in tensors.items():
            if name.startswith("model.layers.2."):
                assert list(tmp_path.glob(".tiny.tmp-*/layer_000.safetensors"))
                assert list(tmp_path.glob(".tiny.tmp-*/layer_001.safetensors"))
            yield name, t

    write_model_dir(
        tmp_path / "tiny",
        name="tiny",
        family="llama",
        config=_config(),
        tensors=stream(),
        tokenizer_json=TOKENIZER_JSON,
        tokenizer_config={},
        dtype=torch.float32,
        source={},
    )
    assert ModelDir.open(tmp_path / "tiny").num_layers == LAYERS


def test_failed_write_leaves_old_dir_and_no_temp(model: tuple[ModelDir, Any]) -> None:
    md, tensors = model
    broken = dict(tensors)
    del broken["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"layer 1: missing tensors mlp\.up_proj\.weight"):
        _write(md.path, tensors=broken)
    assert [p.name for p in md.path.parent.iterdir()] == ["tiny"]
    assert torch.equal(
        ModelDir.open(md.path).load_layer(1)["mlp.up_proj.weight"],
        tensors["model.layers.1.mlp.up_proj.weight"],
    )


def test_unexpected_tensor_is_an_error(tmp_path: Path) -> None:
    tensors = _tensors("llama", _config())
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(HIDDEN)
    with pytest.raises(CheckpointError, match=r"o_proj\.bias"):
        _write(tmp_path / "x", tensors=tensors)


def test_corrupt_byte_is_caught_even_after_a_verified_load(model: tuple[ModelDir, Any]) -> None:
    md, _ = model
    md.load_layer(1)  # hashed and cached
    path = md.path / "layer_001.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse clocks: force a change
    with pytest.raises(
        CheckpointError, match=r"layer_001\.safetensors: sha256 mismatch \(expected"
    ):
        md.load_layer(1)
    md.load_layer(0)  # the other layers are fine


def test_wrong_hash_in_manifest(model: tuple[ModelDir, Any]) -> None:
    md, _ = model
    manifest = json.loads((md.path / "manifest.json").read_text())
    manifest["files"]["layer_002.safetensors"]["sha256"] = "0" * 64
    (md.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"layer_002\.safetensors: sha256 mismatch"):
        ModelDir.open(md.path).load_layer(2)


def test_missing_files(model: tuple[ModelDir, Any]) -> None:
    md, _ = model
    (md.path / "stage.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"stage\.safetensors: missing"):
        md.load_stage()
    (md.path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json: missing"):
        ModelDir.open(md.path)


def test_load_layer_touches_only_its_own_file(model: tuple[ModelDir, Any]) -> None:
    md, tensors = model
    (md.path / "layer_001.safetensors").unlink()
    (md.path / "stage.safetensors").unlink()
    layer = md.load_layer(0)
    assert torch.equal(
        layer["self_attn.q_proj.weight"], tensors["model.layers.0.self_attn.q_proj.weight"]
    )
    with pytest.raises(CheckpointError, match=r"layer_001\.safetensors"):
        md.load_layer(1)


def test_corrupt_safetensors_header_without_verify(model: tuple[ModelDir, Any]) -> None:
    md, _ = model
    path = md.path / "layer_000.safetensors"
    size = path.stat().st_size
    path.write_bytes(b"\xff" * size)  # same size, so only the parse can fail
    with pytest.raises(CheckpointError, match=r"layer_000\.safetensors: unreadable safetensors"):
        md.load_layer(0, verify=False)


def test_layer_index_out_of_range(model: tuple[ModelDir, Any]) -> None:
    md, _ = model
    with pytest.raises(CheckpointError, match="layer 3"):
        md.load_layer(3)
    with pytest.raises(CheckpointError, match="outside"):
        md.layer_files(2, 5)


def test_unknown_model_type_is_a_config_error(tmp_path: Path, model: tuple[ModelDir, Any]) -> None:
    with pytest.raises(ConfigError, match="gpt_neox"):
        write_model_dir(
            tmp_path / "neox",
            name="neox",
            family="llama",
            config={**_config(), "model_type": "gpt_neox"},
            tensors=iter(()),
            tokenizer_json=TOKENIZER_JSON,
            tokenizer_config={},
            dtype=torch.float32,
            source={},
        )
    md, _ = model
    manifest = json.loads((md.path / "manifest.json").read_text())
    manifest["config"]["model_type"] = "gpt_neox"
    (md.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="gpt_neox"):
        ModelDir.open(md.path)


def test_names_resolve_under_models_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: tuple[ModelDir, Any]
) -> None:
    md, _ = model
    monkeypatch.setenv("JARVIS_MODELS", str(md.path.parent))
    monkeypatch.chdir(tmp_path.parent)
    assert models_root() == md.path.parent
    assert ModelDir.open("tiny").path == md.path
    (md.path.parent / "not-a-model").mkdir()
    assert [m.name for m in list_models()] == ["tiny"]
    with pytest.raises(CheckpointError, match=r"manifest\.json: missing"):
        ModelDir.open("absent")
