"""Chain of custody and replay history: when a held message is re-sent, and what is replayed."""

from __future__ import annotations

import torch

from jarvis_mqtt.custody import (
    ACK_TIMEOUT,
    SILENT_AFTER,
    STALL_AFTER,
    STALL_GRACE,
    Custody,
    History,
    Pending,
)
from jarvis_mqtt.membership import MeshView, NodeStatus

TICK = 0.05


def status(node: str, online: bool = True) -> NodeStatus:
    return NodeStatus(node_id=node, model="m", start=0, end=10, online=online)


def pending(mid: str, node: str, now: float) -> Pending:
    return Pending(
        mid=mid, sid="s", step=0, node=node, layer=0, pos=0, n=1, fields={},
        deadline=now + ACK_TIMEOUT,
    )  # fmt: skip


def run_ticks(c: Custody, view: MeshView, start: float, end: float, beat: dict[str, float]):  # type: ignore[no-untyped-def]
    """Call `due()` every TICK from `start` to `end`; nodes in `beat` send a heartbeat every
    beat[node] seconds. Returns (time, pending, verdict) for everything that came due."""
    out = []
    t = start
    last: dict[str, float] = dict.fromkeys(beat, start)
    while t <= end:
        for node, period in beat.items():
            if t - last[node] >= period:
                view.update(status(node), now=t)
                last[node] = t
        out += [(t, p, why) for p, why in c.due(view, now=t)]
        t = round(t + TICK, 6)
    return out


def test_acknowledged_message_is_released_and_never_due() -> None:
    view, c = MeshView(), Custody()
    view.update(status("a"), now=0.0)
    c.track(pending("m1", "a", 0.0))
    assert c.acknowledged("m1") is not None
    assert c.acknowledged("m1") is None  # a second ack (from the other broker) is a no-op
    assert run_ticks(c, view, 0.0, ACK_TIMEOUT + 1, {"a": 0.5}) == []


def test_last_will_makes_the_receiver_dead_at_the_next_tick() -> None:
    view, c = MeshView(), Custody()
    view.update(status("a"), now=0.0)
    c.track(pending("m1", "a", 0.0))
    assert c.due(view, now=0.05) == []
    view.update(status("a", online=False), now=0.1)
    [(p, why)] = c.due(view, now=0.1)
    assert (p.mid, why) == ("m1", "dead")
    assert c.pending == {}


def test_silent_receiver_is_dead_after_silent_after_while_others_beat() -> None:
    view, c = MeshView(), Custody()
    view.update(status("a"), now=0.0)
    view.update(status("b"), now=0.0)
    c.track(pending("m1", "a", 0.0))
    due = run_ticks(c, view, 0.0, 5.0, {"b": 0.5})  # a says nothing after t=0
    [(t, p, why)] = due
    assert why == "dead" and p.mid == "m1"
    assert SILENT_AFTER < t <= SILENT_AFTER + 2 * TICK


def test_live_receiver_without_ack_is_resent_after_the_ack_timeout() -> None:
    view, c = MeshView(), Custody()
    view.update(status("a"), now=0.0)
    c.track(pending("m1", "a", 0.0))
    [(t, _, why)] = run_ticks(c, view, 0.0, ACK_TIMEOUT + 1, {"a": 0.5})
    assert why == "resend" and ACK_TIMEOUT < t <= ACK_TIMEOUT + 2 * TICK


def test_a_stall_of_our_own_judges_no_one_until_heartbeats_could_arrive() -> None:
    """Our loop was blocked 3 s: every heartbeat looks old, but none of them is late."""
    view, c = MeshView(), Custody()
    view.update(status("a"), now=0.0)
    c.track(pending("m1", "a", 0.0))
    assert c.due(view, now=0.05) == []
    # Woken 3 s later; a's heartbeats of the last 3 s are still unread.
    assert c.due(view, now=3.05) == []
    view.update(status("a"), now=3.06)  # ... and are read now
    assert 3.05 + STALL_GRACE + 0.5 < ACK_TIMEOUT  # long enough to have judged, were it not held
    assert run_ticks(c, view, 3.1, ACK_TIMEOUT - 0.1, {"a": 0.5}) == []
    assert "m1" in c.pending


def test_after_the_grace_a_really_silent_receiver_is_still_caught() -> None:
    view, c = MeshView(), Custody()
    view.update(status("a"), now=0.0)
    c.track(pending("m1", "a", 0.0))
    c.due(view, now=0.05)
    assert c.due(view, now=0.05 + STALL_AFTER + 0.5) == []  # a stall: hold
    due = run_ticks(c, view, 0.6 + TICK, 5.0, {"b": 0.5})
    [(t, _, why)] = due
    assert why == "dead" and t >= 0.55 + STALL_GRACE


def test_history_replays_what_was_sent_and_a_resend_overwrites_the_tail() -> None:
    h = History()
    h.store("s", 0, torch.arange(4.0).view(4, 1))  # prompt, positions 0..3
    h.store("s", 4, torch.tensor([[4.0]]))
    h.store("s", 5, torch.tensor([[5.0]]))
    assert h.get("s", 0, 6).flatten().tolist() == [0, 1, 2, 3, 4, 5]  # type: ignore[union-attr]
    h.store("s", 5, torch.tensor([[50.0]]))  # step 5 sent again elsewhere
    assert h.get("s", 4, 6).flatten().tolist() == [4, 50]  # type: ignore[union-attr]
    assert h.get("s", 0, 7) is None  # not all held
    h.store("t", 3, torch.zeros(1, 1))  # never saw its start: nothing to replay from
    assert h.get("t", 3, 4) is None
    assert h.nbytes == 6 * 4
    h.forget("s")
    assert h.get("s", 0, 1) is None and h.nbytes == 0


def test_history_grows_in_place_and_hands_out_copies() -> None:
    h = History()
    h.store("s", 0, torch.zeros(3, 2))
    buffer = h.rows["s"]
    for pos in range(3, 40):  # decode steps: one row each, past the first buffer's room
        h.store("s", pos, torch.full((1, 2), float(pos)))
    assert h.get("s", 3, 40).tolist() == [[float(p)] * 2 for p in range(3, 40)]  # type: ignore[union-attr]
    assert h.nbytes == 40 * 2 * 4
    assert h.rows["s"] is not buffer  # it grew once or more, keeping what it held
    copy = h.get("s", 0, 2)
    assert copy is not None
    copy += 1  # a replay's rows are its own: the history is unchanged
    assert h.get("s", 0, 2).tolist() == [[0.0, 0.0], [0.0, 0.0]]  # type: ignore[union-attr]


def test_hearing_no_one_blames_no_one_and_the_ack_timeout_resends() -> None:
    """Cut off from every broker (or reconnecting): all heartbeats stop at once."""
    view, c = MeshView(), Custody()
    for node in ("a", "b"):
        view.update(status(node), now=0.0)
    c.track(pending("m1", "a", 0.0))
    [(t, _, why)] = run_ticks(c, view, 0.0, ACK_TIMEOUT + 1, {})
    assert why == "resend" and t > ACK_TIMEOUT


def test_a_cleared_status_is_dead_at_once() -> None:
    view, c = MeshView(), Custody()
    view.update(status("a"), now=0.0)
    c.track(pending("m1", "a", 0.0))
    view.forget("a")  # a clean exit clears the retained status
    assert [why for _, why in c.due(view, now=0.05)] == ["dead"]


def test_history_keeps_the_original_steps_for_a_replay() -> None:
    h = History()
    h.store("s", 0, torch.zeros(4, 1))  # the prompt
    for pos in (4, 5, 6):
        h.store("s", pos, torch.zeros(1, 1))  # then one token at a time
    assert h.steps("s", 0, 7) == [4, 1, 1, 1]
    assert h.steps("s", 2, 6) == [2, 1, 1]  # cut where the replay starts and ends
    h.store("s", 5, torch.zeros(2, 1))  # re-sent from 5: what followed is replaced
    assert h.steps("s", 0, 7) == [4, 1, 2]
    # A node that rebuilt its cache from a replay stores its output with the replay's steps.
    h.store("r", 0, torch.zeros(6, 1), steps=[4, 1, 1])
    assert h.steps("r", 0, 6) == [4, 1, 1]
    h.store("q", 0, torch.zeros(3, 1), steps=[1, 1])  # steps that do not add up: one step
    assert h.steps("q", 0, 3) == [3]


def test_a_node_given_up_for_silence_is_taken_back_once_it_beats_again() -> None:
    view, c = MeshView(), Custody()
    view.update(status("a"), now=0.0)
    view.update(status("b"), now=0.0)
    c.track(pending("m1", "a", 0.0))
    [(t, p, why)] = run_ticks(c, view, 0.0, 2.0, {"b": 0.5})
    assert why == "dead"
    p.failed["a"] = t  # what the forwarder records when it gives up on "a"
    assert p.excluded(view) == {"a"}
    view.update(status("a"), now=t + 0.3)  # it was only starved: its heartbeat arrives
    assert p.excluded(view) == set()
