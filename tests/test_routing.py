"""Membership and routing: pure logic, no broker."""

from __future__ import annotations

import pytest

from jarvis_mqtt.errors import ConfigError, MeshError, WireError
from jarvis_mqtt.membership import MeshView, NodeStatus, format_layers, parse_layers
from jarvis_mqtt.routing import next_hop


def st(node: str, start: int, end: int, *, online: bool = True, sessions: int = 0) -> NodeStatus:
    return NodeStatus(
        node_id=node, model="m", start=start, end=end, online=online, load={"sessions": sessions}
    )


def view(*statuses: NodeStatus) -> MeshView:
    v = MeshView()
    for s in statuses:
        v.update(s, now=100.0)
    return v


def test_view_live_missing_and_stale() -> None:
    v = view(st("a", 0, 2), st("b", 2, 4), st("c", 4, 6, online=False))
    assert [s.node_id for s in v.live("m", now=101.0)] == ["a", "b"]
    assert v.missing_layers("m", 6, now=101.0) == [4, 5]
    assert v.live("m", now=100.0 + v.stale_after + 1) == []  # no heartbeat: gone
    assert v.live("other", now=101.0) == []


def test_status_round_trip_and_validation() -> None:
    s = st("a", 0, 3)
    assert NodeStatus.from_dict(s.to_dict()) == s
    with pytest.raises(WireError):
        NodeStatus.from_dict({"node_id": "x", "model": "m", "start": 3, "end": 3})  # empty, not 0
    with pytest.raises(WireError):
        NodeStatus.from_dict({"node_id": "x", "model": "m", "start": 3, "end": 2})
    assert NodeStatus.from_dict({"node_id": "x", "model": "", "start": 0, "end": 0}).idle
    with pytest.raises(WireError):
        NodeStatus.from_dict({"node_id": "x"})
    with pytest.raises(WireError):
        NodeStatus.from_dict([1, 2])


def test_next_hop_prefers_exact_start_then_load_then_sticky() -> None:
    live = [st("mid", 0, 4, sessions=0), st("b2", 2, 4, sessions=5), st("b1", 2, 4, sessions=1)]
    assert next_hop(live, 2, 4).node_id == "b1"  # starts at 2, least loaded
    assert next_hop(live, 2, 4, prefer="b2").node_id == "b2"  # holds the session's cache
    assert next_hop(live, 2, 4, exclude={"b1", "b2"}).node_id == "mid"  # enters mid-span
    hop = next_hop(live, 4, 4)
    assert hop.node_id is None and hop.enter == 4  # all done: back to the client


def test_next_hop_skips_only_when_allowed() -> None:
    live = [st("a", 0, 2), st("c", 4, 6)]
    with pytest.raises(MeshError, match=r"layer 2 has no live node.*2-3"):
        next_hop(live, 2, 6)
    hop = next_hop(live, 2, 6, allow_skip=True)
    assert (hop.node_id, hop.enter, hop.skipped) == ("c", 4, (2, 3))
    with pytest.raises(MeshError, match="may not be skipped"):
        next_hop(live, 2, 6, allow_skip=True, never_skip={3})
    assert next_hop([st("a", 0, 4)], 4, 6, allow_skip=True).skipped == (4, 5)


def test_parse_layers_names_the_flag() -> None:
    assert parse_layers("0, 29,", "--critical") == [0, 29]
    assert parse_layers("", "--critical") == []
    with pytest.raises(ConfigError, match=r"--never-skip '1,x': expected layers"):
        parse_layers("1,x", "--never-skip")


def test_format_layers() -> None:
    assert format_layers([9, 0, 1, 2, 7, 10]) == "0-2, 7, 9-10"
    assert format_layers([]) == ""


def test_next_hop_counts_sessions_this_sender_placed() -> None:
    live = [st("r1", 2, 4), st("r2", 2, 4)]
    assert next_hop(live, 2, 4).node_id == "r1"
    assert next_hop(live, 2, 4, extra_load={"r1": 1}).node_id == "r2"
