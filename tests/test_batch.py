"""Which waiting activations a node packs into one forward step (pure logic), and that a packed
step gives each session what it would get alone."""

from __future__ import annotations

import collections
from collections.abc import Iterable

import torch

from jarvis_mqtt import topics as T
from jarvis_mqtt import wire
from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.errors import CacheMissError
from jarvis_mqtt.runtime import LayerSpan
from node_agent.batch import Work, forward, take_batch

HIDDEN = 4


def work(
    sid: str,
    layer: int = 0,
    n: int = 1,
    replay: list[int] | None = None,
    hidden: torch.Tensor | None = None,
    pos: int = 0,
) -> Work:
    h = torch.zeros(n, HIDDEN) if hidden is None else hidden
    msg = wire.ActivationMessage.from_tensor(
        h, sid=T.SessionId(sid), cid=T.ClientId("c"), model="m", step=0, layer=layer, pos=pos
    )
    return Work(msg, h, 0.0, replay)


def sids(ws: Iterable[Work]) -> list[str]:
    return [w.msg.sid for w in ws]


def test_one_message_per_session_at_the_oldest_entry_layer_the_rest_kept_in_order() -> None:
    inbox = collections.deque([work("a"), work("b", layer=2), work("a"), work("c"), work("d", 2)])
    batch, rest = take_batch(inbox, max_tokens=64)
    assert sids(batch) == ["a", "c"]
    assert sids(rest) == ["b", "a", "d"]
    batch, rest = take_batch(rest, max_tokens=64)
    assert sids(batch) == ["b", "d"] and sids(rest) == ["a"]


def test_token_limit_holds_unless_one_message_alone_exceeds_it() -> None:
    batch, rest = take_batch(collections.deque([work("a", n=3), work("b", n=3)]), max_tokens=4)
    assert sids(batch) == ["a"] and sids(rest) == ["b"]
    batch, rest = take_batch(collections.deque([work("a", n=9), work("b")]), max_tokens=4)
    assert sids(batch) == ["a"] and sids(rest) == ["b"]


def test_a_replay_runs_alone() -> None:
    inbox = collections.deque([work("r", n=3, replay=[2, 1]), work("a")])
    batch, rest = take_batch(inbox, max_tokens=64)
    assert sids(batch) == ["r"] and sids(rest) == ["a"]
    inbox = collections.deque([work("a"), work("r", n=3, replay=[2, 1]), work("b")])
    batch, rest = take_batch(inbox, max_tokens=64)
    assert sids(batch) == ["a", "b"] and sids(rest) == ["r"]


def test_an_empty_inbox_gives_nothing() -> None:
    assert take_batch(collections.deque(), max_tokens=8) == ([], collections.deque())


def test_a_packed_step_gives_each_session_what_it_gets_alone_and_survives_a_bad_one(
    smollm2_dir: ModelDir,
) -> None:
    hidden = int(smollm2_dir.config["hidden_size"])
    torch.manual_seed(0)
    xs = {"a": torch.randn(5, hidden), "b": torch.randn(3, hidden)}
    alone = LayerSpan.load(smollm2_dir, 0, 2)
    want = {sid: forward(alone, [work(sid, n=len(x), hidden=x)])[0].hidden for sid, x in xs.items()}
    packed = LayerSpan.load(smollm2_dir, 0, 2)
    batch = [work(sid, n=len(x), hidden=x) for sid, x in xs.items()]
    batch.insert(1, work("lost", hidden=torch.randn(1, hidden), pos=7))  # no cache for it
    got = forward(packed, batch)
    assert [o.work.msg.sid for o in got] == ["a", "lost", "b"]
    assert isinstance(got[1].error, CacheMissError) and got[1].hidden is None
    for o in (got[0], got[2]):
        assert o.error is None and o.hidden is not None
        torch.testing.assert_close(o.hidden, want[o.work.msg.sid], atol=1e-5, rtol=0)
