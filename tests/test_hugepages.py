"""Weight arenas: tensors carved from one mapping, on transparent huge pages where Linux has
them, and a loaded span's fused matrices all inside its arena."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.hugepages import ALIGN, HUGE_PAGE, WeightArena, anon_huge_bytes, arena_bytes
from jarvis_mqtt.model import DecoderLayer
from jarvis_mqtt.runtime import LayerSpan, load_client_stages

pytest_plugins = ["tests.fixtures_models"]


def _thp_mode() -> str:
    """The kernel's THP setting ('always', 'madvise', 'never'), or '' without THP."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else ""


def test_arena_hands_out_aligned_disjoint_tensors_then_falls_back() -> None:
    shapes: list[tuple[tuple[int, ...], torch.dtype]] = [
        ((3, 5), torch.float32),
        ((7,), torch.bfloat16),
        ((4, 4), torch.float16),
    ]
    arena = WeightArena(arena_bytes(shapes))
    tensors = [arena.empty(shape, dtype) for shape, dtype in shapes]
    for t, (shape, dtype) in zip(tensors, shapes, strict=True):
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        assert arena.contains(t) and t.data_ptr() % ALIGN == 0
    assert tensors[0].data_ptr() % HUGE_PAGE == 0  # the arena starts on a huge page
    for i, t in enumerate(tensors):  # written one by one, each keeps its own values
        t.fill_(i + 1)
    assert [int(t.float().sum()) for t in tensors] == [15, 14, 48]
    extra = arena.empty((1 << 20,), torch.float32)  # does not fit: ordinary memory
    assert not arena.contains(extra) and extra.shape == (1 << 20,)


def test_tensors_keep_the_mapping_alive() -> None:
    arena = WeightArena(arena_bytes([((256,), torch.float32)]))
    t = arena.empty((256,), torch.float32)
    t.copy_(torch.arange(256.0))
    del arena  # the tensor still owns the mapping
    assert torch.equal(t, torch.arange(256.0))


def test_span_and_head_weights_live_on_huge_pages(smollm2_dir: ModelDir) -> None:
    before = anon_huge_bytes()
    span = LayerSpan.load(smollm2_dir, 3, 6)
    _, head = load_client_stages(smollm2_dir)
    fused = [
        t
        for layer in span.layers
        for t in (layer.self_attn.qkv_t, layer.self_attn.o_t, layer.mlp.gate_up_t, layer.mlp.down_t)
    ]
    assert all(t is not None for t in fused) and head.lm_head_t is not None
    bases = {t.untyped_storage().data_ptr() for t in fused if t is not None}
    assert len(bases) == 1  # one mapping for the whole span
    shapes = DecoderLayer.fused_shapes(span.args) * 3
    want = arena_bytes([(s, span.dtype) for s in shapes]) + head.lm_head_t.nbytes
    mode = _thp_mode()
    if mode not in ("always", "madvise"):
        pytest.skip("this kernel gives no transparent huge pages on request")
    got = anon_huge_bytes() - before
    assert got > want - 2 * HUGE_PAGE, (got, want)  # all but each arena's tail
    if mode == "madvise":  # only what was advised: the tails stay on small pages
        assert got <= want, (got, want)
