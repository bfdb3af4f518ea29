"""The placement planner: properties, brute force, LLaMPS' example; and `jarvis plan`."""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jarvis_mqtt import placement_search
from jarvis_mqtt.brokers import BrokerAddress
from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.errors import CheckpointError, ConfigError
from jarvis_mqtt.evaluate import load_criticality
from jarvis_mqtt.membership import NodeStatus
from jarvis_mqtt.placement import (
    ModelSpec,
    NodeSpec,
    PlacementError,
    Plan,
    compare,
    equal_split,
    from_spans,
    memory_split,
    plan,
)
from jarvis_mqtt.placement_apply import assignments, keep_stable, plan_id, spans_of, to_publish
from jarvis_mqtt.plan_apply import MeshState
from jarvis_mqtt.plan_cli import nodes_from_entries, register
from jarvis_mqtt.topics import Assignment, Topics, pack_assignment, pack_status
from jarvis_mqtt.transport import MeshMessage

GB = 10**9


def model_of(sizes: Sequence[int], costs: Sequence[float] | None = None, **kw: Any) -> ModelSpec:
    return ModelSpec(
        name="m",
        layer_bytes=tuple(sizes),
        layer_cost=tuple(costs) if costs is not None else (1.0,) * len(sizes),
        **kw,
    )


def node(node_id: str, memory: int, sec: float = 1.0) -> NodeSpec:
    return NodeSpec(node_id=node_id, memory_bytes=memory, sec_per_layer=sec)


# -- invariants every plan keeps -----------------------------------------------------------------


def check_plan(p: Plan, model: ModelSpec, nodes: Sequence[NodeSpec], kv_per_layer: int) -> None:
    """Memory, spans, copies on distinct nodes, coverage: what every plan must satisfy."""
    n, by_id = model.num_layers, {nd.node_id: nd for nd in nodes}
    ids = [pl.node_id for pl in p.placements]
    assert len(ids) == len(set(ids)), "a node hosts one span"
    assert sorted(ids + list(p.idle)) == sorted(by_id)
    coverage = [0] * n
    holders: list[set[str]] = [set() for _ in range(n)]
    for pl in p.placements:
        assert 0 <= pl.start < pl.end <= n  # half-open, never empty
        weights = sum(model.layer_bytes[pl.start : pl.end])
        assert pl.weight_bytes == weights
        assert pl.need_bytes == p.overhead_bytes + weights + kv_per_layer * pl.layers
        assert pl.need_bytes <= by_id[pl.node_id].memory_bytes, "never over memory"
        for i in range(pl.start, pl.end):
            coverage[i] += 1
            assert pl.node_id not in holders[i]
            holders[i].add(pl.node_id)
    assert tuple(coverage) == p.coverage
    assert all(1 <= c <= p.replication for c in coverage)
    for copy in range(p.replication if p.fully_replicated else 1):
        spans = sorted((pl.start, pl.end) for pl in p.placements if pl.copy == copy)
        assert spans[0][0] == 0 and spans[-1][1] == n  # each full copy tiles [0, n)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert p.bottleneck_s == max(pl.sec_per_token for pl in p.placements)
    assert p.tokens_per_s == pytest.approx(1 / p.bottleneck_s)


@st.composite
def problems(
    draw: st.DrawFn, max_layers: int = 14, nodes: tuple[int, int] = (1, 6), roomy: bool = False
) -> dict:
    """A model, nodes, copies, overhead and KV; `roomy`: every node could hold half the model."""
    n = draw(st.integers(1, max_layers))
    costs = st.floats(0.1, 10.0, allow_nan=False, allow_infinity=False)
    model = model_of(
        draw(st.lists(st.integers(1, 100), min_size=n, max_size=n)),
        draw(st.lists(costs, min_size=n, max_size=n)),
        critical=frozenset(draw(st.sets(st.integers(0, n - 1), max_size=3))),
        kv_bytes_per_token=draw(st.integers(0, 3)),
    )
    overhead, kv_tokens = draw(st.integers(0, 40)), draw(st.integers(0, 2))
    whole = overhead + model.total_bytes + kv_tokens * model.kv_bytes_per_token * n
    m = draw(st.integers(*nodes))
    # From nothing to twice the whole model: fits, is tight, or cannot fit.
    memory = st.integers(whole // 2, whole * 2)
    if not roomy:
        memory |= st.integers(0, whole // 2)
    mems = draw(st.lists(memory, min_size=m, max_size=m))
    secs = draw(st.lists(st.sampled_from([0.1, 0.3, 0.5, 1.0, 1.7, 4.0]), min_size=m, max_size=m))
    return {
        "model": model,
        "nodes": [
            node(f"n{j}", mem, sec) for j, (mem, sec) in enumerate(zip(mems, secs, strict=True))
        ],
        "replication": draw(st.integers(1, 3)),
        "overhead_bytes": overhead,
        "kv_tokens": kv_tokens,
    }


def _run(pb: dict) -> Plan | PlacementError:
    try:
        return plan(pb["model"], pb["nodes"], replication=pb["replication"],
                    overhead_bytes=pb["overhead_bytes"], kv_tokens=pb["kv_tokens"])  # fmt: skip
    except PlacementError as e:
        return e


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_plans_keep_memory_spans_and_copies(pb: dict) -> None:
    p = _run(pb)
    kv = pb["kv_tokens"] * pb["model"].kv_bytes_per_token
    if isinstance(p, PlacementError):
        assert p.missing_bytes > 0 and f"{p.missing_bytes} bytes" in str(p)
        return
    check_plan(p, pb["model"], pb["nodes"], kv)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems() | problems(roomy=True), st.integers(1, 2))
def test_planner_never_slower_than_the_baselines(pb: dict, replication: int) -> None:
    scores = compare(pb["model"], pb["nodes"], replication=replication,
                     overhead_bytes=pb["overhead_bytes"], kv_tokens=pb["kv_tokens"])  # fmt: skip
    best = scores["planner"]
    for method in ("equal", "memory"):
        base = scores[method]
        if base.plan is None:
            assert base.reason  # too little memory, or fewer nodes than copies
            continue
        kv = pb["kv_tokens"] * pb["model"].kv_bytes_per_token
        check_plan(base.plan, pb["model"], pb["nodes"], kv)
        assert best.plan is not None and best.plan.fully_replicated
        assert best.plan.bottleneck_s <= base.plan.bottleneck_s, method


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_layers=24, nodes=(13, 16)), st.integers(1, 2))
def test_many_distinct_nodes_use_the_heuristic_and_keep_every_rule(
    pb: dict, replication: int
) -> None:
    nodes = [node(nd.node_id, nd.memory_bytes + 1000 * j, nd.sec_per_layer)
             for j, nd in enumerate(pb["nodes"])]  # fmt: skip
    assert 2 ** len(nodes) > placement_search.EXACT_STATES  # too many for the exact search
    scores = compare(pb["model"], nodes, replication=replication,
                     overhead_bytes=pb["overhead_bytes"], kv_tokens=pb["kv_tokens"])  # fmt: skip
    best = scores["planner"].plan
    assert best is not None  # each node has 1000+ bytes: plenty
    check_plan(best, pb["model"], nodes, pb["kv_tokens"] * pb["model"].kv_bytes_per_token)
    for method in ("equal", "memory"):
        base = scores[method].plan
        if base is not None:
            assert best.fully_replicated and best.bottleneck_s <= base.bottleneck_s


# -- the optimum, by brute force -----------------------------------------------------------------


def brute_force(pb: dict, replication: int) -> float | None:
    """Least bottleneck over every choice of one span or none per node; None when none fits."""
    model, nodes = pb["model"], pb["nodes"]
    n = model.num_layers
    costs = placement_search.Costs(
        model.layer_bytes, model.layer_cost, [nd.memory_bytes for nd in nodes],
        [nd.sec_per_layer for nd in nodes], overhead_bytes=pb["overhead_bytes"],
        kv_bytes_per_layer=pb["kv_tokens"] * model.kv_bytes_per_token,
    )  # fmt: skip
    options = [None, *((s, e) for s in range(n) for e in range(s + 1, n + 1))]
    best = None
    for choice in itertools.product(options, repeat=len(nodes)):
        cover = [0] * n
        worst = 0.0
        for j, span in enumerate(choice):
            if span is None:
                continue
            if costs.need(*span) > nodes[j].memory_bytes:
                break
            for i in range(*span):
                cover[i] += 1
            worst = max(worst, costs.time(j, *span))
        else:
            if all(c == replication for c in cover) and (best is None or worst < best):
                best = worst
    return best


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_layers=4, nodes=(1, 4)) | problems(max_layers=4, nodes=(2, 4), roomy=True),
       st.integers(1, 2))  # fmt: skip
def test_planner_finds_the_brute_force_optimum(pb: dict, replication: int) -> None:
    optimum = brute_force(pb, replication)
    p = _run({**pb, "replication": replication})
    if optimum is None:
        assert isinstance(p, PlacementError) or not p.fully_replicated
    else:
        assert isinstance(p, Plan) and p.fully_replicated
        assert p.bottleneck_s == optimum


# -- LLaMPS' example -----------------------------------------------------------------------------


def llamps() -> tuple[ModelSpec, list[NodeSpec]]:
    """LLaMA 2 70B (80 blocks, ~300 GB) on servers s1..s5; speed proportional to cores."""
    model = ModelSpec.uniform("llama-2-70b", 80, int(3.75 * GB))
    servers = [(155, 8), (113.5, 8), (83.5, 2), (83.5, 4), (83.5, 8)]
    nodes = [NodeSpec.with_speed(f"s{i + 1}", int(gb * GB), cores, cores=cores)
             for i, (gb, cores) in enumerate(servers)]  # fmt: skip
    return model, nodes


def test_llamps_example_beats_equal_and_memory_proportional_splits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, nodes = llamps()
    scores = compare(model, nodes)
    best = scores["planner"].plan
    assert best is not None and best.fully_replicated
    assert best.coverage == (1,) * 80
    check_plan(best, model, nodes, 0)
    with capsys.disabled():
        print("\nLLaMPS example, tokens/s with one layer taking 1 s on one core:")
        for method, s in scores.items():
            print(f"  {method:8} {s.tokens_per_s:.4f}  bottleneck {s.bottleneck_s} s/token")
        print(best.summary())
    planner, equal, memory = (scores[m].tokens_per_s for m in ("planner", "equal", "memory"))
    assert planner is not None and equal is not None and memory is not None
    assert planner > memory > equal
    # 22 blocks per 8-core server: 2.75 s; equal: 16 on 2 cores, 8 s; by memory: 13 on 2, 6.5 s
    assert (planner, equal, memory) == pytest.approx((1 / 2.75, 1 / 8, 1 / 6.5))


def test_llamps_with_two_copies_replicates_first_and_last_block_first() -> None:
    model, nodes = llamps()
    p = plan(model, nodes, replication=2)
    check_plan(p, model, nodes, 0)
    assert not p.fully_replicated  # 519 GB for 600 GB of copies
    assert p.coverage[0] == p.coverage[79] == 2
    assert p.replica_missing_bytes == 3750000000 * len(p.under_replicated)


# -- copies when memory is short -----------------------------------------------------------------


def test_critical_layers_get_the_extra_copies_first() -> None:
    model = model_of([10] * 10, critical=frozenset({0, 9}))
    nodes = [node("big", 100), node("a", 10), node("b", 10)]
    p = plan(model, nodes, replication=2)
    assert p.coverage == (2, 1, 1, 1, 1, 1, 1, 1, 1, 2)
    assert p.under_replicated == list(range(1, 9))
    assert p.replica_missing_bytes == 80
    assert "fewer than 2 copies of layers 1-8" in p.summary()


def test_one_spare_copy_goes_to_the_most_important_critical_layer() -> None:
    importance = (0.1, 0, 0, 0, 0, 5.0, 0, 0, 0, 0.7)
    model = model_of([10] * 10, critical=frozenset({0, 9}), importance=importance)
    p = plan(model, [node("big", 100), node("spare", 10)], replication=2)
    assert [i for i, c in enumerate(p.coverage) if c == 2] == [9]  # critical beats layer 5
    p = plan(model, [node("big", 100), node("spare", 10)], replication=2, critical=[5])
    assert [i for i, c in enumerate(p.coverage) if c == 2] == [5]


def test_extra_copies_grow_runs_next_to_critical_ones() -> None:
    model = model_of([10] * 10, critical=frozenset({0, 9}))
    p = plan(model, [node("big", 100), node("spare", 30)], replication=2)
    assert p.coverage == (2, 2, 2, 1, 1, 1, 1, 1, 1, 1)  # 9 would need a node of its own
    # Three copies: the critical layer's third copy comes before any other layer's second.
    model = model_of([10] * 10, critical=frozenset({0}))
    spares = [node(f"s{i}", 10) for i in range(3)]
    p = plan(model, [node("big", 100), *spares], replication=3)
    assert p.coverage[0] == 3 and sum(p.coverage) == 10 + 3


def test_speed_decides_where_once_copies_are_settled() -> None:
    model = model_of([10] * 4)
    nodes = [node("slow", 40, 4.0), node("fast", 40, 1.0), node("mid", 20, 2.0)]
    p = plan(model, nodes)  # fast 3 layers (3 s) + mid 1 (2 s); any other split is slower
    assert {pl.node_id: pl.layers for pl in p.placements} == {"fast": 3, "mid": 1}
    assert p.bottleneck_s == 3.0 and p.bottleneck.node_id == "fast" and p.idle == ("slow",)


# -- does not fit --------------------------------------------------------------------------------


def test_model_too_big_names_the_missing_bytes() -> None:
    with pytest.raises(PlacementError) as e:
        plan(model_of([10] * 10), [node("a", 30), node("b", 40)])
    assert e.value.missing_bytes == 30
    assert "layers [7, 10)" in str(e.value) and "30 bytes" in str(e.value)


def test_enough_memory_in_total_but_not_in_one_piece() -> None:
    with pytest.raises(PlacementError) as e:
        plan(model_of([50, 50]), [node("a", 40), node("b", 40), node("c", 40)])
    assert e.value.missing_bytes == 100 and "not in pieces" in str(e.value)


def test_overhead_and_kv_count_against_memory() -> None:
    model = model_of([10] * 4, kv_bytes_per_token=1)
    assert plan(model, [node("a", 40)]).placements[0].need_bytes == 40
    with pytest.raises(PlacementError) as e:
        plan(model, [node("a", 40)], overhead_bytes=5)  # a hosting node needs 45
    assert e.value.missing_bytes == 10
    with pytest.raises(PlacementError) as e:
        plan(model, [node("a", 40)], kv_tokens=3)  # 13 bytes per layer
    assert e.value.missing_bytes == 13  # 3 layers fit, the last with its KV does not
    with pytest.raises(PlacementError):
        plan(model, [])


def test_bad_inputs_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        plan(model_of([1]), [node("a", 1), node("a", 1)])
    with pytest.raises(ConfigError):
        plan(model_of([1]), [node("a", 1)], replication=0)
    with pytest.raises(ConfigError):
        plan(model_of([1]), [node("a", 1)], critical=[3])
    with pytest.raises(ConfigError):
        model_of([1], [0.0])
    with pytest.raises(ConfigError):
        node("a", 1, sec=0.0)


# -- baselines -----------------------------------------------------------------------------------


def test_baselines_split_in_the_given_order() -> None:
    model = model_of([10] * 10)
    nodes = [node("a", 100), node("b", 300), node("c", 100)]
    assert equal_split(model, nodes).spans_by_node() == {"a": (0, 4), "b": (4, 7), "c": (7, 10)}
    assert memory_split(model, nodes).spans_by_node() == {"a": (0, 2), "b": (2, 8), "c": (8, 10)}
    two = equal_split(model, [*nodes, node("d", 100)], replication=2)
    assert two.fully_replicated and two.spans_by_node()["c"] == (0, 5)


def test_compare_reports_an_infeasible_baseline() -> None:
    scores = compare(model_of([10] * 10), [node("a", 90), node("b", 20)])
    assert scores["planner"].fits and scores["planner"].plan is not None
    assert scores["planner"].plan.spans_by_node() == {"a": (0, 8), "b": (8, 10)}
    assert not scores["equal"].fits and scores["equal"].tokens_per_s is None
    assert scores["equal"].missing_bytes == 30 and "b with layers [5, 10)" in scores["equal"].reason
    assert scores["memory"].fits  # 90:20 -> 8 and 2 layers


# -- from the model directory and from statuses --------------------------------------------------


def fake_model_dir(path: Path, sizes: Sequence[int]) -> Path:
    """A manifest-only model directory: enough for planning, no weights."""
    path.mkdir(parents=True)
    n = len(sizes)
    files = {f"layer_{i:03d}.safetensors": {"sha256": "0", "bytes": b} for i, b in enumerate(sizes)}
    files["stage.safetensors"] = {"sha256": "0", "bytes": 999}
    config = {"model_type": "llama", "num_hidden_layers": n, "hidden_size": 64,
              "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    manifest = {
        "format": 1, "name": path.name, "family": "llama", "dtype": "bfloat16", "config": config,
        "num_layers": n, "stage_file": "stage.safetensors",
        "layers": {str(i): f"layer_{i:03d}.safetensors" for i in range(n)}, "files": files,
    }  # fmt: skip
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_model_spec_from_model_dir(tmp_path: Path) -> None:
    md = ModelDir.open(fake_model_dir(tmp_path / "tiny", [100, 200, 300, 400]))
    spec = ModelSpec.from_model_dir(md)
    assert spec.layer_bytes == (100, 200, 300, 400) and spec.layer_cost == (1.0,) * 4
    assert spec.critical == {0, 3} and spec.importance == ()
    assert spec.kv_bytes_per_token == 2 * 2 * 16 * 2  # k and v, 2 kv heads of 16, bf16
    (md.path / "criticality.json").write_text(json.dumps({
        "never_skip": [1],
        "layers": {"0": {"acc_drop": 0.5, "kl": 0.1}, "2": {"acc_drop": 0.1, "kl": 0.9}},
    }))  # fmt: skip
    spec = ModelSpec.from_model_dir(md)
    assert spec.critical == {1} and spec.importance == (0.1, 0.0, 0.9, 0.0)
    assert spec.priority() == [1, 2, 0, 3]
    assert ModelSpec.from_model_dir(md, critical=[2], cost=[1, 2, 3, 4]).critical == {2}
    (md.path / "criticality.json").write_text(json.dumps({"layers": {"0": {"acc_drop": 0.5}}}))
    spec = ModelSpec.from_model_dir(md)
    assert spec.critical == {0, 3} and spec.importance == (0.5, 0.0, 0.0, 0.0)
    (md.path / "criticality.json").write_text(json.dumps({"never_skip": [9]}))
    with pytest.raises(CheckpointError, match="outside"):
        ModelSpec.from_model_dir(md)
    (md.path / "criticality.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"criticality\.json"):
        ModelSpec.from_model_dir(md)


def test_node_spec_from_status_capacity_keys() -> None:
    cap = {"memory_bytes": 4 * GB, "cores": 4, "sec_per_layer": 0.002, "bench_model": "x",
           "threads": 4, "kv_budget_bytes": 1}  # fmt: skip
    status = NodeStatus(node_id="pi-1", model="", start=0, end=0, capacity=cap)
    spec = NodeSpec.from_status(status)
    assert (spec.memory_bytes, spec.cores, spec.sec_per_layer, spec.measured) == (
        4 * GB, 4, 0.002, True,
    )  # fmt: skip
    assert spec.extra["threads"] == 4
    assert NodeSpec.from_status(status, bench_scale={"x": 3.0}).sec_per_layer == 0.006
    guess = NodeSpec.from_capacity("pi-2", {"memory_bytes": GB, "cores": 2}, core_sec_per_layer=1)
    assert guess.sec_per_layer == 0.5 and not guess.measured
    with pytest.raises(ConfigError, match="memory_bytes"):
        NodeSpec.from_capacity("pi-3", {"cores": 2})


def test_nodes_from_entries_calibrate_estimates_and_skip_non_contributors() -> None:
    entries = [
        {"node_id": "a", "capacity": {"memory_bytes": 100, "cores": 4, "sec_per_layer": 0.01}},
        {"node": "b", "state": "online", "capacity": {"memory_bytes": 100, "cores": 2}},
        {"node": "c", "state": "offline", "capacity": {"memory_bytes": 100}},
        {"node_id": "agent", "capacity": {"kv_budget_bytes": 5}},
        {"node_id": "d", "memory_gb": 1.5, "cores": 1},
        {"node_id": "e", "memory_bytes": "lots"},
    ]
    nodes, notes = nodes_from_entries(entries)
    by_id = {nd.node_id: nd for nd in nodes}
    assert sorted(by_id) == ["a", "b", "d"]
    assert by_id["b"].sec_per_layer == pytest.approx(0.02)  # 0.04 core-seconds over 2 cores
    assert by_id["d"].memory_bytes == int(1.5 * GB)
    assert any("agent" in x for x in notes) and any("e:" in x or "node e" in x for x in notes)
    with pytest.raises(PlacementError):
        nodes_from_entries([{"node_id": "agent", "capacity": {}}])


# -- `jarvis plan` -------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jarvis")
    p.add_argument("--models-dir")
    register(p.add_subparsers(dest="cmd", required=True))
    a = p.parse_args(argv)
    return int(a.func(a))


def test_jarvis_plan_prints_the_plan_and_baselines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_model_dir(tmp_path / "models" / "tiny", [10 * 2**20] * 8)
    nodes = [{"node_id": "pi-1", "memory_bytes": 200 * 2**20, "cores": 4},
             {"node_id": "pi-2", "memory_bytes": 400 * 2**20, "cores": 1}]  # fmt: skip
    (tmp_path / "nodes.json").write_text(json.dumps(nodes))
    base = ["--models-dir", str(tmp_path / "models"), "plan", "--model", "tiny",
            "--nodes-json", str(tmp_path / "nodes.json"), "--overhead-mb", "100"]  # fmt: skip
    assert run_cli(base) == 0
    out = capsys.readouterr().out
    assert "plan for tiny" in out and "pi-1" in out and "tokens/s" in out
    assert "equal split" in out and "memory-proportional split" in out

    assert run_cli([*base, "--json", "--replication", "2", "--critical", "3"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["fits"] and got["plan"]["replication"] == 2 and got["plan"]["critical"] == [3]
    assert {p["node"] for p in got["plan"]["placements"]} == {"pi-1", "pi-2"}
    assert set(got["compare"]) == {"planner", "equal", "memory"}

    assert run_cli([*base, "--json", "--overhead-mb", "1000"]) == 2
    got = json.loads(capsys.readouterr().out)
    assert not got["fits"] and got["compare"]["planner"]["missing_bytes"] > 0
    with pytest.raises(PlacementError, match="missing"):
        run_cli([*base, "--overhead-mb", "1000"])


# -- applying a plan: assignments, what changes, stability ---------------------------------------


def test_from_spans_rebuilds_an_applied_plan_or_says_why_not() -> None:
    model, nodes = model_of([10] * 6), [node("a", 100), node("b", 100), node("c", 30)]
    p = from_spans(model, nodes, {"a": (0, 3), "b": (3, 6), "c": (0, 2)}, replication=2)
    assert p.method == "given" and p.coverage == (2, 2, 1, 1, 1, 1)
    assert p.bottleneck_s == 3.0 and p.latency_s == 6.0
    assert p.spans_by_node() == {"a": (0, 3), "b": (3, 6), "c": (0, 2)}
    with pytest.raises(PlacementError, match="memory"):
        from_spans(model, nodes, {"a": (0, 2), "c": (2, 6)})
    with pytest.raises(PlacementError, match="no such node"):
        from_spans(model, nodes, {"a": (0, 3), "gone": (3, 6)})
    with pytest.raises(PlacementError, match="full copy"):
        from_spans(model, nodes, {"a": (0, 3), "b": (4, 6)})


def test_assignments_keep_other_models_and_empty_or_clear_the_rest() -> None:
    current = {
        "a": Assignment((("m", 0, 4), ("other", 0, 2)), "old"),
        "b": Assignment((("m", 4, 8),), "old"),
        "gone": Assignment((("m", 0, 8),), "old"),
    }
    spans = {"a": (0, 5), "c": (5, 8)}
    got = assignments("m", spans, ["a", "b", "c"], current)
    pid = plan_id("m", spans)
    assert got == {
        "a": Assignment((("m", 0, 5), ("other", 0, 2)), pid),
        "b": Assignment((), pid),  # live, in no plan: hosts nothing
        "c": Assignment((("m", 5, 8),), pid),
        "gone": None,  # neither live nor planned: its retained assignment is cleared
    }
    assert plan_id("m", dict(spans)) == pid != plan_id("m", {"a": (0, 5), "c": (5, 7)})
    assert spans_of("m", current) == {"a": (0, 4), "b": (4, 8), "gone": (0, 8)}
    assert spans_of("other", current) == {"a": (0, 2)}
    assert to_publish(current, got) == got  # every node's spans or id changed
    applied = {n: a for n, a in got.items() if a is not None}
    assert to_publish(applied, got) == {}
    again = assignments("m", spans, ["a", "b", "c"], {**applied, "d": Assignment((), "x")})
    assert to_publish({**applied, "d": Assignment((), "x")}, again) == {}  # spans all the same
    moved = assignments("m", {"a": (0, 4), "c": (4, 8)}, ["a", "b", "c"], applied)
    assert set(to_publish(applied, moved)) == {"a", "b", "c"}  # same spans, new plan id: "b"


def test_assignments_carry_the_manifest_hash_of_each_hosted_model() -> None:
    hm, ho = "11" * 32, "22" * 32
    current = {"a": Assignment((("m", 0, 4), ("other", 0, 2)), "old", (("other", ho),))}
    got = assignments("m", {"a": (0, 5), "b": (5, 8)}, ["a", "b", "c"], current, manifest=hm)
    a, b, c = got["a"], got["b"], got["c"]
    assert a is not None and a.manifests == (("m", hm), ("other", ho))  # the other kept
    assert b is not None and b.manifests == (("m", hm),)
    assert c is not None and c.manifests == ()  # hosts nothing: needs no files
    dropped = assignments("other", {}, ["a"], {"a": a})["a"]
    assert dropped is not None and dropped.manifests == (("m", hm),)  # a span gone, its hash too


def test_keep_stable_keeps_the_applied_plan_unless_clearly_worse() -> None:
    model = model_of([10] * 12)
    three = [node("a", 10**6), node("b", 10**6), node("c", 10**6)]
    best = plan(model, three)
    assert best.bottleneck_s == 4.0
    nearly = from_spans(model, three, {"a": (0, 4), "b": (4, 8), "c": (8, 12)})
    assert keep_stable(best, nearly) is nearly
    lopsided = from_spans(model, three, {"a": (0, 6), "b": (6, 9), "c": (9, 12)})
    assert keep_stable(best, lopsided) is best  # 6 s against 4 s per token
    assert keep_stable(best, None) is best
    four = [*three, node("d", 10**6)]
    assert (
        keep_stable(plan(model, four), from_spans(model, four, nearly.spans_by_node())).bottleneck_s
        == 3.0
    )
    two = plan(model, four, replication=2)
    assert keep_stable(two, from_spans(model, four, nearly.spans_by_node(), replication=2)) is two


def test_jarvis_plan_reads_criticality_json_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    md = fake_model_dir(tmp_path / "models" / "tiny", [10 * 2**20] * 8)
    nodes = [{"node_id": f"pi-{i}", "memory_bytes": 200 * 2**20, "cores": 4} for i in range(3)]
    (tmp_path / "nodes.json").write_text(json.dumps(nodes))
    base = ["--models-dir", str(tmp_path / "models"), "plan", "--model", "tiny", "--json",
            "--nodes-json", str(tmp_path / "nodes.json"), "--overhead-mb", "50",
            "--replication", "2"]  # fmt: skip
    assert run_cli(base) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["critical"] == [0, 7]  # no file
    # What `jarvis eval sweep` writes (eval_sweep.criticality): never_skip and per-layer kl.
    (md / "criticality.json").write_text(json.dumps({
        "model": "tiny", "metric": "kl", "never_skip": [3, 4],
        "layers": {str(i): {"acc_drop": 0.0, "kl": 0.1 * i, "agreement": 1.0} for i in range(8)},
    }))  # fmt: skip
    assert load_criticality(md) is not None  # the evaluator's reader accepts it too
    assert run_cli(base) == 0
    got = json.loads(capsys.readouterr().out)["plan"]
    assert got["critical"] == [3, 4]
    assert run_cli([*base, "--critical", "1"]) == 0  # the flag wins over the file
    assert json.loads(capsys.readouterr().out)["plan"]["critical"] == [1]


def test_jarvis_plan_apply_flags_are_checked() -> None:
    with pytest.raises(ConfigError, match="--watch goes with --apply"):
        run_cli(["plan", "--model", "x", "--watch"])
    with pytest.raises(ConfigError, match="no --nodes-json"):
        run_cli(["plan", "--model", "x", "--apply", "--nodes-json", "f.json"])


def test_mesh_state_folds_contributors_and_assignments() -> None:
    topics = Topics("t")
    state = MeshState(topics)
    where = BrokerAddress("localhost", 1883)

    def msg(topic: str, payload: bytes) -> MeshMessage:
        return MeshMessage(topic, payload, True, 1, where)

    def status(node_id: str, **kw: Any) -> bytes:
        base: dict[str, Any] = dict(model="", start=0, end=0, capacity={"memory_bytes": GB})
        return pack_status(NodeStatus(node_id=node_id, **{**base, **kw}))

    assert state.fold(msg(topics.node_status("a"), status("a")))
    assert state.fold(msg(topics.node_status("b"), status("b")))
    assert state.fold(msg(topics.node_status("a.m.1"), status("a.m.1", model="m", end=3)))
    assert state.fold(msg(topics.node_status("c"), status("c", capacity={"cores": 2})))
    assert state.fold(msg(topics.node_status("d"), status("d", online=False)))
    assert [e["node_id"] for e in state.entries("m")] == ["a", "b"]  # idle, live, with memory
    before = state.key("m")
    assert state.fold(msg(topics.node_status("b"), b""))  # b left cleanly
    assert [k for k, _ in state.key("m")] == ["a"] and state.key("m") != before
    assert state.fold(msg(topics.node_status("a"), status("a", time=5.0)))
    assert [k for k, _ in state.key("m")] == ["a"]  # a heartbeat is no change
    # Once "a" hosts 300 MB of model "m", a planner of "x" sees only what is left; the
    # planner of "m" still counts it all (its own spans are its to move).
    hosting = {"hosting": [{"model": "m", "start": 0, "end": 3, "bytes": 300 * 10**6}]}
    assert state.fold(msg(topics.node_status("a"), status("a", load=hosting)))
    assert state.entries("x")[0]["capacity"]["memory_bytes"] == GB - 300 * 10**6
    assert state.entries("m")[0]["capacity"]["memory_bytes"] == GB
    assert state.key("x") != state.key("m")
    a = Assignment((("m", 0, 3),), "p")
    assert state.fold(msg(topics.assign("a"), pack_assignment(a)))
    assert state.current == {"a": a}
    assert state.fold(msg(topics.assign("a"), b"")) and state.current == {}
    assert not state.fold(msg(topics.assign("a"), b"\xc1"))  # bad payload: skipped
    assert not state.fold(msg("t/m/m/free", b""))  # not a status or an assignment


def test_clients_take_never_skip_layers_from_the_sweep(tmp_path: Path) -> None:
    from jarvis_mqtt.client import default_never_skip

    md = ModelDir.open(fake_model_dir(tmp_path / "tiny", [100, 200, 300, 400]))
    assert default_never_skip(md) == [0, 3]  # no sweep yet: first and last, as the poster
    (md.path / "criticality.json").write_text(json.dumps({"never_skip": [1, 2], "layers": {}}))
    assert default_never_skip(md) == [1, 2]
