"""The model directory: a manifest, one safetensors file per decoder layer, and a stage file.

A node needs only the files of its layers, so each decoder layer is its own file named in
`manifest.json` with its sha256 and size; `stage.safetensors` holds what a client needs (token
embedding, final norm, LM head when untied). Tensor names follow Hugging Face, minus the
`model.layers.N.` prefix inside a layer file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from jarvis_mqtt.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from jarvis_mqtt.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
STAGE_FILE = "stage.safetensors"
FAMILIES = ("llama", "qwen2", "gemma", "gemma3")
# config.json model_type -> family; transformers calls a text-only Gemma 3 "gemma3_text".
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma", "gemma3": "gemma3"}
MODEL_TYPES["gemma3_text"] = "gemma3"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_STAGE_NAMES = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# Buffers some checkpoints carry that no model needs: recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# (resolved path, size, mtime_ns) -> sha256 of files already hashed in this process.
_HASHED: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def models_root() -> Path:
    """Where named models live: `$JARVIS_MODELS`, else `~/.cache/jarvis/models`."""
    env = os.environ.get("JARVIS_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jarvis" / "models"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; a `CheckpointError` names the file otherwise."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path.name}: unreadable in {path.parent}: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path.name}: not a JSON object in {path.parent}")
    return value


def family_of(config: Mapping[str, Any]) -> str:
    """The family of a Hugging Face style config; a `ConfigError` names an unknown model_type."""
    model_type = str(config.get("model_type", ""))
    try:
        return MODEL_TYPES[model_type]
    except KeyError:
        raise ConfigError(
            f"unsupported model_type {model_type!r}: supported are {', '.join(MODEL_TYPES)}"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    """ "float32" / "bfloat16" / "float16" for a torch dtype."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ConfigError(f"unsupported dtype {dtype}; choose one of {', '.join(DTYPES)}")


def layer_file_name(index: int) -> str:
    """File name of decoder layer `index`."""
    return f"layer_{index:03d}.safetensors"


def layer_tensor_names(family: str, config: Mapping[str, Any]) -> frozenset[str]:
    """The tensor names a layer file of this family must hold, and no others."""
    names = {
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        *(f"self_attn.{p}_proj.weight" for p in "qkvo"),
    }
    if config.get("attention_bias", family == "qwen2"):
        names |= {f"self_attn.{p}_proj.bias" for p in "qkv"}
    if family == "gemma3":
        names |= {
            "self_attn.q_norm.weight",
            "self_attn.k_norm.weight",
            "pre_feedforward_layernorm.weight",
            "post_feedforward_layernorm.weight",
        }
    return frozenset(names)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def write_model_dir(
    out_dir: Path,
    *,
    name: str,
    family: str,
    config: dict[str, Any],
    tensors: Iterable[tuple[str, torch.Tensor]],
    tokenizer_json: str,
    tokenizer_config: dict[str, Any],
    dtype: torch.dtype,
    source: dict[str, Any],
) -> Path:
    """Write a model directory from Hugging Face named tensors, one layer in memory at a time.

    Everything goes to a temporary sibling first and is renamed into place at the end.
    """
    if family not in FAMILIES or family_of(config) != family:
        raise ConfigError(
            f"family {family!r} does not match model_type {config.get('model_type')!r}"
        )
    num_layers = int(config["num_hidden_layers"])
    expected = layer_tensor_names(family, config)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        pending: dict[int, dict[str, torch.Tensor]] = {}
        written: set[int] = set()
        stage: dict[str, torch.Tensor] = {}
        for hf_name, tensor in tensors:
            if hf_name.endswith(_IGNORED_SUFFIXES):
                continue
            if hf_name in _STAGE_NAMES:
                stage[_STAGE_NAMES[hf_name]] = tensor.to(dtype).contiguous()
                continue
            m = _LAYER_RE.match(hf_name)
            if m is None:
                raise CheckpointError(f"unexpected tensor {hf_name!r} for a {family} model")
            index, key = int(m.group(1)), m.group(2)
            if index >= num_layers or index in written:
                raise CheckpointError(f"tensor {hf_name!r}: layer {index} out of range or repeated")
            if key not in expected:
                raise CheckpointError(f"unexpected tensor {hf_name!r} for a {family} model")
            layer = pending.setdefault(index, {})
            layer[key] = tensor.to(dtype).contiguous()
            if len(layer) == len(expected):
                save_file(pending.pop(index), str(tmp / layer_file_name(index)))
                written.add(index)
        missing = sorted(set(range(num_layers)) - written)
        if missing:
            first = missing[0]
            lacking = sorted(expected - set(pending.get(first, {})))
            raise CheckpointError(f"layer {first}: missing tensors {', '.join(lacking)}")
        _write_stage(tmp, stage, config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        for p in tmp.iterdir():
            p.chmod(0o644)  # safetensors writes 0600; nodes may run as another user
        files = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.iterdir())
        }
        manifest = {
            "format": FORMAT,
            "name": name,
            "family": family,
            "dtype": dtype_name(dtype),
            "config": config,
            "num_layers": num_layers,
            "stage_file": STAGE_FILE,
            "layers": {str(i): layer_file_name(i) for i in range(num_layers)},
            "files": files,
            "source": source,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_stage(tmp: Path, stage: dict[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    for key in ("embed_tokens.weight", "norm.weight"):
        if key not in stage:
            raise CheckpointError(f"missing tensor model.{key}")
    head = stage.get("lm_head.weight")
    tied = bool(config.get("tie_word_embeddings", family_of(config) in ("gemma", "gemma3")))
    if head is not None and tied:
        if torch.equal(head, stage["embed_tokens.weight"]):
            del stage["lm_head.weight"]
        else:
            log.warning("config ties embeddings but lm_head.weight differs: keeping lm_head")
    if head is None and not tied:
        raise CheckpointError("missing tensor lm_head.weight (embeddings are not tied)")
    save_file(stage, str(tmp / STAGE_FILE))


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`, replacing an older directory there."""
    for _ in range(3):  # another process importing the same model may slip in between
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileNotFoundError):
            out_dir.rename(old)
        try:
            tmp.rename(out_dir)
            return
        except OSError:
            continue
        finally:
            shutil.rmtree(old, ignore_errors=True)
    raise CheckpointError(f"{out_dir}: cannot replace it (is another import writing it?)")


class ModelDir:
    """An imported model directory: its manifest, and loaders for single layers and the stage."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, name_or_path: str | Path) -> ModelDir:
        """Open a directory, or a model by name under `models_root()`."""
        p = Path(name_or_path).expanduser()
        if isinstance(name_or_path, str) and len(p.parts) == 1 and not p.is_dir():
            p = models_root() / name_or_path
        mpath = p / MANIFEST
        if not mpath.is_file():
            raise CheckpointError(f"{MANIFEST}: missing in {p} (is the model imported?)")
        manifest = read_json(mpath)
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{MANIFEST}: not a format {FORMAT} manifest in {p}")
        for key in ("name", "family", "dtype", "config", "num_layers", "layers", "files"):
            if key not in manifest:
                raise CheckpointError(f"{MANIFEST}: no {key!r} in {p}")
        if family_of(manifest["config"]) != manifest["family"]:
            raise CheckpointError(f"{MANIFEST}: family does not match model_type in {p}")
        if manifest["dtype"] not in DTYPES:
            raise CheckpointError(f"{MANIFEST}: unknown dtype {manifest['dtype']!r} in {p}")
        return cls(p, manifest)

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        """The model's name (its directory name when imported by name)."""
        return str(self.manifest["name"])

    @property
    def family(self) -> str:
        """One of `FAMILIES`."""
        return str(self.manifest["family"])

    @property
    def config(self) -> dict[str, Any]:
        """The Hugging Face style config dict."""
        return dict(self.manifest["config"])

    @property
    def num_layers(self) -> int:
        """Decoder layers in the model."""
        return int(self.manifest["num_layers"])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the tensors are stored in."""
        return DTYPES[self.manifest["dtype"]]

    def _check_range(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self.num_layers:
            raise CheckpointError(
                f"{self.name}: layer range [{start}, {end}) outside [0, {self.num_layers})"
            )

    def layer_files(self, start: int, end: int) -> list[str]:
        """File names of layers `[start, end)`."""
        self._check_range(start, end)
        return [self.manifest["layers"][str(i)] for i in range(start, end)]

    def shard_bytes(self, start: int, end: int, include_stage: bool) -> int:
        """Bytes on disk of layers `[start, end)`, plus the stage file if asked."""
        names = self.layer_files(start, end) + ([STAGE_FILE] if include_stage else [])
        return sum(int(self._entry(n)["bytes"]) for n in names)

    def _entry(self, filename: str) -> Mapping[str, Any]:
        try:
            return self.manifest["files"][filename]
        except KeyError:
            raise CheckpointError(f"{filename}: not listed in {self.path / MANIFEST}") from None

    def file(self, filename: str, verify: bool = True) -> Path:
        """Path of one listed file, checked to exist and, if asked, to match its sha256."""
        entry = self._entry(filename)
        path = self.path / filename
        try:
            st = path.stat()
        except OSError:
            raise CheckpointError(f"{filename}: missing from {self.path}") from None
        if st.st_size != entry["bytes"]:
            raise CheckpointError(
                f"{filename}: size mismatch (expected {entry['bytes']} bytes, got {st.st_size})"
            )
        if verify:
            key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
            with _HASH_LOCK:
                got = _HASHED.get(key)
            if got is None:
                got = sha256_file(path)
                with _HASH_LOCK:
                    _HASHED[key] = got
            if got != entry["sha256"]:
                raise CheckpointError(
                    f"{filename}: sha256 mismatch (expected {entry['sha256']}, got {got})"
                )
        return path

    def _load(self, filename: str, verify: bool) -> dict[str, torch.Tensor]:
        """The file's tensors, as views of one private mapping of it: the mapping, and every
        page read through it (counted in the process's RSS), lives as long as any of them does.
        A caller keeping weights keeps copies (see `runtime`), and no view, not even a norm's."""
        path = self.file(filename, verify)
        try:
            # safe_open maps the file; only this file's pages are ever read.
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{filename}: unreadable safetensors: {e}") from e

    def load_layer(self, index: int, verify: bool = True) -> dict[str, torch.Tensor]:
        """Tensors of decoder layer `index`, with names relative to the layer (mapped views)."""
        if not 0 <= index < self.num_layers:
            raise CheckpointError(f"{self.name}: layer {index} outside [0, {self.num_layers})")
        return self._load(self.manifest["layers"][str(index)], verify)

    def load_stage(self, verify: bool = True) -> dict[str, torch.Tensor]:
        """Embedding, final norm and (when untied) LM head (mapped views)."""
        return self._load(self.manifest.get("stage_file", STAGE_FILE), verify)

    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, chat template and special tokens."""
        from jarvis_mqtt.tokenizer import Tokenizer

        for name in ("tokenizer.json", "tokenizer_config.json"):
            if name in self.manifest["files"]:
                self.file(name)
        return Tokenizer.from_model_dir(self.path)

    def check(self, full: bool = False) -> None:
        """Every listed file exists with its size; with `full`, its sha256 too."""
        for name in self.manifest["files"]:
            self.file(name, verify=full)


def list_models(root: Path | None = None) -> list[ModelDir]:
    """Imported models under `root` (default `models_root()`), by name; unreadable ones skipped."""
    root = models_root() if root is None else Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not (p / MANIFEST).is_file():
            continue
        try:
            found.append(ModelDir.open(p))
        except (CheckpointError, ConfigError) as e:
            # One broken directory should not hide the others from a listing.
            log.warning("skipping %s: %s", p, e)
    return found
