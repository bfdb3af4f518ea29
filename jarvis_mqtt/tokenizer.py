"""Tokenizer: encode/decode, streaming detokenization, chat templates, and GGUF vocabularies.

A model directory holds a `tokenizers` JSON and a `tokenizer_config.json` (chat template, special
tokens, whether to add BOS, the ids that end a reply). GGUF files carry only a vocabulary; the
builders here rebuild the same tokenizer transformers' GGUF loader makes from one.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from jarvis_mqtt.checkpoint import read_json
from jarvis_mqtt.errors import CheckpointError, ConfigError, JarvisError

# llama.cpp token types (gguf.TokenType).
_CONTROL, _USER_DEFINED = 3, 4
# Gemma's own template (the Gemma 3 GGUF carries none): system text folds into the first turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
# Pre-tokenizer split patterns of byte-level vocabularies, by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> ids for one model, with its special tokens and chat template."""

    def __init__(self, backend: Backend, config: Mapping[str, Any]) -> None:
        self.backend = backend
        self.config = dict(config)
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.bos_token_id = None if self.bos_token is None else backend.token_to_id(self.bos_token)
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # no flag: do what the JSON's post-processor does
            first = backend.encode("", add_special_tokens=True).ids[:1]
            add_bos = self.bos_token_id is not None and first == [self.bos_token_id]
        self.add_bos_token = bool(add_bos) and self.bos_token_id is not None
        eos_ids = config.get("eos_token_ids")
        if not eos_ids and self.eos_token is not None:
            eos_ids = [backend.token_to_id(self.eos_token)]
        # A plain attribute: front ends may widen or clear the set of ids that end a reply.
        self.eos_token_ids: frozenset[int] = frozenset(
            int(i) for i in eos_ids or () if i is not None
        )
        self.chat_template = _pick_template(config.get("chat_template"))

    @classmethod
    def from_model_dir(cls, path: Path | str) -> Tokenizer:
        """Load `tokenizer.json` and `tokenizer_config.json` (optional) from a directory."""
        path = Path(path)
        try:
            backend = Backend.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises plain Exception for missing and corrupt files
            raise CheckpointError(f"tokenizer.json: cannot load from {path}: {e}") from e
        cfg_path = path / "tokenizer_config.json"
        config = read_json(cfg_path) if cfg_path.is_file() else {}
        jinja = path / "chat_template.jinja"
        if not config.get("chat_template") and jinja.is_file():
            config["chat_template"] = jinja.read_text()
        return cls(backend, config)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from the `tokenizer.*` metadata of a GGUF file (plain values)."""
        backend, config = build_gguf_tokenizer(meta)
        return cls(backend, config)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; BOS first only when asked and the model wants it."""
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token:
            assert self.bos_token_id is not None
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render a conversation the way transformers' `apply_chat_template` does (as text)."""
        if not self.chat_template:
            raise ConfigError("this model has no chat template; encode raw text instead")
        special = {
            k: _token_str(self.config.get(k)) for k in ("bos_token", "eos_token", "unk_token")
        }
        special["pad_token"] = _token_str(self.config.get("pad_token"))
        try:
            return _compile(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **{k: v for k, v in special.items() if v is not None},
                **kwargs,
            )
        except jinja2.TemplateError as e:
            raise JarvisError(f"chat template: {e}") from e


def hf_tokenizer_files(src: Path, eos_ids: Iterable[int] = ()) -> tuple[str, dict[str, Any]]:
    """tokenizer.json text and our tokenizer_config dict from a Hugging Face model directory.

    The chat template may sit in tokenizer_config.json, chat_template.jinja or
    chat_template.json; EOS ids gather the config's, generation_config.json's and the token's.
    """
    tok_json = src / "tokenizer.json"
    if not tok_json.is_file():
        raise CheckpointError(f"tokenizer.json: missing from {src}")
    loaded = Tokenizer.from_model_dir(src)  # reads tokenizer_config.json, chat_template.jinja
    tokens = ("bos_token", "eos_token", "unk_token", "pad_token")
    config: dict[str, Any] = {k: _token_str(loaded.config.get(k)) for k in tokens}
    for flag in ("add_bos_token", "add_eos_token"):
        config[flag] = loaded.config.get(flag)
    config["chat_template"] = loaded.chat_template
    if not loaded.chat_template and (src / "chat_template.json").is_file():
        raw = read_json(src / "chat_template.json")
        config["chat_template"] = _pick_template(raw.get("chat_template"))
    tokenizer = Tokenizer(loaded.backend, config)
    config["add_bos_token"] = tokenizer.add_bos_token  # resolved from the JSON if unset
    eos = set(tokenizer.eos_token_ids) | set(eos_ids)
    gen = src / "generation_config.json"
    if gen.is_file():
        value = read_json(gen).get("eos_token_id")
        eos |= set(value if isinstance(value, list) else [value] if value is not None else [])
    config["eos_token_ids"] = sorted(int(i) for i in eos)
    return tok_json.read_text(), {k: v for k, v in config.items() if v is not None}


def _pick_template(value: Any) -> str | None:
    """A template string; older configs list named templates and the default one is used."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        value = named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers marks it)."""

    tags = {"generation"}  # noqa: RUF012 (jinja2's own class attribute)

    def parse(self, parser: Any) -> Any:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False
) -> str:
    # Unlike jinja2's own filter this does not HTML-escape, as transformers does.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class StreamDecoder:
    """Turns ids into text deltas, holding back bytes of a UTF-8 character not yet complete."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        # Decoding restarts a few ids back so tokenizers that drop a leading space still diff
        # correctly: text of ids[prefix:read] was emitted, ids[read:] not yet.
        self._prefix = 0
        self._read = 0

    def _text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (often empty mid-character)."""
        self.ids.append(token_id)
        done = self._text(self.ids[self._prefix : self._read])
        text = self._text(self.ids[self._prefix :])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(done) :]
        return ""

    def flush(self) -> str:
        """Whatever is held back, even an incomplete character (as U+FFFD)."""
        done = self._text(self.ids[self._prefix : self._read])
        text = self._text(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(done) :] if text.startswith(done) else ""


# -- GGUF vocabularies ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def derive_merges(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary, best score first (transformers' `generate_merges`)."""
    found: list[tuple[str, str, float]] = []
    for piece, score in scores.items():
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _byte_level_bpe(tokens: Sequence[str], merges: Iterable[str], pre: str | None) -> Backend:
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    vocab = {
        t if set(t) <= letters else "".join(alphabet[b] for b in t.encode()): i
        for i, t in enumerate(tokens)
    }
    pairs = [(a, b) for a, _, b in (m.partition(" ") for m in merges)]
    bpe = BPE(vocab, pairs, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    backend = Backend(bpe)
    if pre == "smollm":
        # SmolLM2's own tokenizer.json: every digit apart, then GPT-2's byte-level split.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    tokens: Sequence[str], scores: Sequence[float], gemma: bool, prefix_space: bool, unk: str | None
) -> Backend:
    if gemma:
        # Gemma files store runs of spaces as real spaces where the vocabulary has "▁" runs, and
        # their scores do not follow merge order; file order does (as transformers found).
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
        ranks: Mapping[str, float] = {t: -i for i, t in enumerate(tokens)}
    else:
        ranks = dict(zip(tokens, scores, strict=True))
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = BPE(vocab, derive_merges(vocab, ranks), unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = Backend(bpe)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        scheme = "first" if prefix_space else "never"
        backend.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme=scheme, split=False)
        if prefix_space:
            steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def build_gguf_tokenizer(meta: Mapping[str, Any]) -> tuple[Backend, dict[str, Any]]:
    """A `tokenizers` tokenizer and a tokenizer_config dict from GGUF `tokenizer.*` metadata."""
    kind = meta.get("tokenizer.ggml.model")
    arch = str(meta.get("general.architecture", ""))
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    gemma = arch.startswith("gemma")
    if kind == "gpt2":
        backend = _byte_level_bpe(
            tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre")
        )
    elif kind == "llama":
        scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        backend = _sentencepiece_bpe(tokens, scores, gemma, prefix, token("unknown"))
    else:
        raise ConfigError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
    # Control tokens are special (matched whole, skipped when decoding); user-defined ones are
    # matched whole too. A byte-level "control" token outside the byte alphabet is a llama.cpp
    # mislabel that transformers skips, and so do we.
    letters = set(_byte_alphabet().values()) if kind == "gpt2" else None
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _CONTROL and (letters is None or set(t) <= letters)
        ]
    )
    vocab = backend.get_vocab()
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _USER_DEFINED and t in vocab
        ]
    )
    eos_ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    if gemma and "<end_of_turn>" in vocab:
        eos_ids.append(vocab["<end_of_turn>"])
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    config = {
        "chat_template": meta.get("tokenizer.chat_template")
        or (GEMMA_CHAT_TEMPLATE if gemma else None),
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(add_bos),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "eos_token_ids": sorted({int(i) for i in eos_ids if i is not None}),
    }
    return backend, config
