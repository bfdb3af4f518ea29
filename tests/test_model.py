"""The runtime against Hugging Face transformers, on tiny random models of every family."""

from __future__ import annotations

import gc
import itertools
import os
import random

import pytest
import torch

from jarvis_mqtt.errors import CacheMissError, SessionError
from jarvis_mqtt.importers import import_hf_dir
from jarvis_mqtt.model import Segment
from jarvis_mqtt.runtime import LayerSpan, load_client_stages

transformers = pytest.importorskip("transformers")

VOCAB = 320
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _config(family: str):  # type: ignore[no-untyped-def]
    if family == "llama":
        return transformers.LlamaConfig(**COMMON, num_hidden_layers=5, tie_word_embeddings=False)
    if family == "qwen2":
        return transformers.Qwen2Config(**COMMON, num_hidden_layers=5, tie_word_embeddings=True)
    if family == "gemma":
        return transformers.GemmaConfig(**COMMON, num_hidden_layers=5, head_dim=16)
    if family == "llama3-rope":  # Llama 3.1's frequency-dependent RoPE scaling
        scaling = {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
        }  # fmt: skip
        return transformers.LlamaConfig(**COMMON, num_hidden_layers=3, rope_scaling=scaling)
    if family == "gemma3-rope":  # Gemma 3 4B+: linear scaling on the global layers only
        return transformers.Gemma3TextConfig(
            **COMMON, num_hidden_layers=6, head_dim=32, sliding_window=8,
            query_pre_attn_scalar=32, rope_scaling={"rope_type": "linear", "factor": 8.0},
        )  # fmt: skip
    # Six layers so one is global and five slide; a window of 8 so prompts cross it.
    return transformers.Gemma3TextConfig(
        **COMMON, num_hidden_layers=6, head_dim=32, sliding_window=8, query_pre_attn_scalar=32
    )


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


@pytest.fixture(
    scope="module", params=["llama", "qwen2", "gemma", "gemma3", "llama3-rope", "gemma3-rope"]
)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A random-weight checkpoint of one family, written as HF files and imported."""
    torch.manual_seed(0)
    cfg = _config(request.param)
    cfg._attn_implementation = "eager"
    cfg.eos_token_id = VOCAB - 1
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # perturb norms too, so (1 + w) against w would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    src = tmp_path_factory.mktemp(f"hf-{request.param}")
    model.save_pretrained(src)
    (src / "tokenizer.json").write_text(_tokenizer_json())
    md = import_hf_dir(src, name=f"tiny-{request.param}", out_root=src / "out", progress=False)
    return model, md


def _reference(model, ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_logits_match_transformers(tiny) -> None:  # type: ignore[no-untyped-def]
    model, md = tiny
    ids = [random.Random(1).randrange(VOCAB) for _ in range(21)]
    embed, head = load_client_stages(md)
    span = LayerSpan.load(md, 0, md.num_layers)
    # Prefill in two chunks, then one decode step: all three paths of the attention.
    out = [head(span(embed(torch.tensor(ids[:12])), [Segment("s", 0, 12)]))]
    out.append(head(span(embed(torch.tensor(ids[12:20])), [Segment("s", 12, 8)])))
    out.append(head(span(embed(torch.tensor(ids[20:])), [Segment("s", 20, 1)])))
    torch.testing.assert_close(torch.cat(out), _reference(model, ids), atol=1e-3, rtol=0)


def test_any_split_into_spans_matches_one_span(tiny) -> None:  # type: ignore[no-untyped-def]
    _, md = tiny
    n = md.num_layers
    ids = torch.tensor([random.Random(2).randrange(VOCAB) for _ in range(13)])
    embed, head = load_client_stages(md)
    whole = head(LayerSpan.load(md, 0, n)(embed(ids), [Segment("s", 0, 13)]))
    rng = random.Random(3)
    for _ in range(3):
        cuts = sorted(rng.sample(range(1, n), rng.randint(1, n - 1)))
        bounds = [0, *cuts, n]
        h = embed(ids)
        for a, b in itertools.pairwise(bounds):
            h = LayerSpan.load(md, a, b)(h, [Segment("s", 0, 13)])
        torch.testing.assert_close(head(h), whole, atol=1e-5, rtol=0)


def test_packed_batch_of_sessions_matches_separate_runs(tiny) -> None:  # type: ignore[no-untyped-def]
    model, md = tiny
    embed, head = load_client_stages(md)
    span = LayerSpan.load(md, 0, md.num_layers)
    rng = random.Random(4)
    prompts = {s: [rng.randrange(VOCAB) for _ in range(n)] for s, n in [("a", 5), ("b", 11)]}
    for s, ids in prompts.items():  # each session prefilled alone, to a different length
        span(embed(torch.tensor(ids)), [Segment(s, 0, len(ids))])
    # One step: "a" decodes one token, "b" decodes one, "c" is a fresh 7-token prefill.
    c_ids = [rng.randrange(VOCAB) for _ in range(7)]
    step = {"a": [3], "b": [9], "c": c_ids}
    segments = [
        Segment("a", 5, 1),
        Segment("b", 11, 1),
        Segment("c", 0, 7),
    ]
    tokens = torch.tensor([t for s in ("a", "b", "c") for t in step[s]])
    logits = head(span(embed(tokens), segments))
    torch.testing.assert_close(
        logits[0], _reference(model, prompts["a"] + [3])[-1], atol=1e-3, rtol=0
    )
    torch.testing.assert_close(
        logits[1], _reference(model, prompts["b"] + [9])[-1], atol=1e-3, rtol=0
    )
    torch.testing.assert_close(logits[2:], _reference(model, c_ids), atol=1e-3, rtol=0)


def test_greedy_generation_token_identical(tiny) -> None:  # type: ignore[no-untyped-def]
    from jarvis_mqtt.generate import LocalModel
    from jarvis_mqtt.sampling import SamplingParams

    model, md = tiny
    prompt = [5, 17, 33, 2, 99]
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False
        )[0, len(prompt) :].tolist()
    local = LocalModel(md)
    params = SamplingParams(max_new_tokens=32)
    # min_new_tokens above stops transformers at EOS; do the same by ignoring our EOS rule.
    local.tokenizer.eos_token_ids = frozenset()
    ours = [e.token_id for e in local.generate(prompt, params)]
    assert ours == ref


def test_session_errors_and_budget(tiny) -> None:  # type: ignore[no-untyped-def]
    _, md = tiny
    embed, _ = load_client_stages(md)
    one = LayerSpan.load(md, 0, 2)._cache_bytes(256)  # one session's first cache chunk
    budget = 2 * one + one // 2  # room for two sessions, not three
    span = LayerSpan.load(md, 0, 2, kv_budget_bytes=budget, max_seq_len=300)
    h = embed(torch.tensor([1, 2, 3]))
    with pytest.raises(SessionError, match="unknown session"):
        span(h[:1], [Segment("nope", 4, 1)])
    span(h, [Segment("a", 0, 3)])
    with pytest.raises(SessionError, match="skips ahead"):
        span(h[:1], [Segment("a", 7, 1)])
    with pytest.raises(SessionError, match="context full"):
        span(h[:1], [Segment("a", 300, 1)])
    with pytest.raises(SessionError, match="KV memory full"):
        for i in range(100):
            span(h, [Segment(f"s{i}", 0, 3)])
    assert span.kv_bytes <= budget and len(span.sessions) == 2
    assert span.free("a") and not span.free("a")
    live = set(span.sessions)
    assert live and set(span.expire(now=1e18)) == live
    assert span.sessions == {}


def test_layers_skipped_by_a_mid_span_entry_ask_for_a_replay(tiny) -> None:  # type: ignore[no-untyped-def]
    """Entering at layer 1 leaves layer 0 without those positions: a later message entering at
    layer 0 is a cache miss from 0, and the replay (in the original steps) fills it exactly."""
    _, md = tiny
    n = md.num_layers
    embed, _ = load_client_stages(md)
    h = embed(torch.tensor([3, 4, 5, 6, 7]))
    span = LayerSpan.load(md, 0, n)
    span(h[:4], [Segment("s", 0, 4)], skip=[0])  # its upstream hosted layer 0 itself
    with pytest.raises(CacheMissError) as e:
        span(h[4:], [Segment("s", 4, 1)])  # now it must run layer 0 too: nothing cached there
    assert e.value.have == 0
    span(h[:4], [Segment("s", 0, 4)])  # the replay, in the original steps
    got = span(h[4:], [Segment("s", 4, 1)])
    fresh = LayerSpan.load(md, 0, n)
    fresh(h[:4], [Segment("t", 0, 4)])
    assert torch.equal(got, fresh(h[4:], [Segment("t", 4, 1)]))


def test_bfloat16_runs_close_to_float32(tiny) -> None:  # type: ignore[no-untyped-def]
    _, md = tiny
    ids = torch.tensor([7, 8, 9, 10])
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        embed, head = load_client_stages(md, dtype)
        span = LayerSpan.load(md, 0, md.num_layers, dtype=dtype)
        outs.append(head(span(embed(ids), [Segment("s", 0, 4)])))
    assert outs[1].dtype == torch.float32  # logits are always float32
    assert torch.argmax(outs[0], -1).tolist() == torch.argmax(outs[1], -1).tolist()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_loaded_stages_keep_no_file_mapped(tiny) -> None:  # type: ignore[no-untyped-def]
    """Weights are copied out of the mapped safetensors: a view left alive (a norm, or the
    autograd graph of a copy from a Parameter) would keep a file's read pages resident."""
    _, md = tiny

    def mapped() -> list[str]:
        gc.collect()
        with open("/proc/self/maps") as f:
            return [line.split()[-1] for line in f if str(md.path) in line]

    for dtype in (torch.float32, torch.bfloat16):
        embed, head = load_client_stages(md, dtype)
        span = LayerSpan.load(md, 0, md.num_layers, dtype=dtype)
        assert mapped() == []
        for layer in span.layers:
            fused = (layer.self_attn.qkv_t, layer.self_attn.o_t, layer.mlp.gate_up_t)
            assert all(t is not None and t.grad_fn is None and t.dtype == dtype for t in fused)
        assert head.lm_head_t is not None and head.lm_head_t.grad_fn is None
        head(span(embed(torch.tensor([7, 8])), [Segment("s", 0, 2)]))


def test_heads_stored_in_pairs_rotate_as_rotate_half() -> None:
    """`pair_order` then `rotate_pairs_` is rotate-half's `apply` followed by the same
    reordering, and q·k products do not see the reordering."""
    from jarvis_mqtt.model import ModelArgs
    from jarvis_mqtt.rope import RopeTable, pair_order

    args = ModelArgs(
        family="llama", vocab_size=16, hidden_size=64, intermediate_size=32, num_layers=1,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 16, generator=g)  # (N, heads, head_dim)
    angles = RopeTable.build(args, 10000.0, 64, torch.float32, scaled=False).at(
        torch.tensor([0, 1, 7, 30, 63])
    )
    paired = x.clone().flatten(1)
    pair_order(paired, 3)
    paired = paired.view(5, 3, 16)
    assert not torch.equal(paired, x)  # the order did change
    rotated = paired.clone()
    angles.rotate_pairs_(rotated)
    expected = angles.apply(x).flatten(1)
    pair_order(expected, 3)
    torch.testing.assert_close(rotated, expected.view(5, 3, 16), rtol=1e-6, atol=1e-6)
    q, k = angles.apply(x), angles.apply(x.flip(0))
    qp, kp = paired.clone(), paired.flip(0).clone()
    angles.rotate_pairs_(qp)
    angles.rotate_pairs_(kp)
    torch.testing.assert_close(
        torch.einsum("nhd,mhd->hnm", qp, kp), torch.einsum("nhd,mhd->hnm", q, k)
    )


def test_decode_steps_run_on_the_thread_count_measured_fastest(tiny) -> None:  # type: ignore[no-untyped-def]
    """At n > 1 torch threads the first decode-sized step times the span on 1 and on n
    threads (a scratch session, freed after); steps then run on the faster, the thread count
    is restored after each, and results equal those of a span on 1 thread."""
    _, md = tiny
    ids = torch.tensor([random.Random(4).randrange(VOCAB) for _ in range(9)])
    embed, _ = load_client_stages(md)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = LayerSpan.load(md, 0, md.num_layers)
        one(embed(ids[:8]), [Segment("s", 0, 8)])
        expected = one(embed(ids[8:]), [Segment("s", 8, 1)])
        assert one._decode_threads == {}  # nothing to choose on one thread
        torch.set_num_threads(2)
        two = LayerSpan.load(md, 0, md.num_layers)
        seen: list[int] = []
        run = two._forward
        two._forward = lambda *a: (seen.append(torch.get_num_threads()), run(*a))[1]  # type: ignore[method-assign]
        two(embed(ids[:8]), [Segment("s", 0, 8)])
        assert two._decode_threads == {} and seen == [2]  # a prefill is not decode-sized
        got = two(embed(ids[8:]), [Segment("s", 8, 1)])
        assert two._decode_threads[2] in (1, 2) and two.decode_threads() == two._decode_threads[2]
        assert len(seen) > 2  # the dry runs, then the step
        assert seen[-1] == two._decode_threads[2] and torch.get_num_threads() == 2
        assert set(two.sessions) == {"s"}  # the scratch session is gone
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        for pick in (1, 2):
            two._decode_threads[2] = pick
            two(embed(ids[8:]), [Segment("s", 8, 1)])
            assert seen[-1] == pick and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_one_row_decode_path_equals_the_general_one(tiny) -> None:  # type: ignore[no-untyped-def]
    """`DecoderLayer.forward_one`, which runs float32 decode steps of the layers `fuse` marks,
    gives what the general `forward` gives for the same step and leaves the same cache."""
    _, md = tiny
    ids = torch.tensor([random.Random(5).randrange(VOCAB) for _ in range(11)])
    embed, _ = load_client_stages(md)
    spans = [LayerSpan.load(md, 0, md.num_layers) for _ in range(2)]
    marked = [layer.one_row for layer in spans[0].layers]  # type: ignore[union-attr]
    if md.config["model_type"].startswith("gemma3"):
        assert not any(marked)  # QK-norm or sandwich norms: the general path only
        return
    assert all(marked)
    for layer in spans[1].layers:
        layer.one_row = False  # type: ignore[union-attr,assignment]
    outs = []
    for span in spans:
        span(embed(ids[:8]), [Segment("s", 0, 8)])
        outs.append([span(embed(ids[i : i + 1]), [Segment("s", i, 1)]) for i in range(8, 11)])
    for got, want in zip(*outs, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for a, b in zip(spans[0].sessions["s"].caches, spans[1].sessions["s"].caches, strict=True):
        torch.testing.assert_close(a.kv[:, :, :11], b.kv[:, :, :11], atol=1e-6, rtol=1e-5)
