"""Contributor nodes: join with no layers, take assignments, rebalance mid-chat, two models."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jarvis_mqtt import topics as T
from jarvis_mqtt.brokers import BrokerAddress
from jarvis_mqtt.checkpoint import MANIFEST, ModelDir, sha256_file
from jarvis_mqtt.client import RemoteModel, wait_for_nodes
from jarvis_mqtt.generate import LocalModel
from jarvis_mqtt.membership import MeshView, NodeStatus
from jarvis_mqtt.mesh import stop_pid
from jarvis_mqtt.plan_apply import leftover_capacity
from jarvis_mqtt.sampling import SamplingParams
from jarvis_mqtt.transport import MeshClient
from tests.fixtures_models import models_cache
from tests.test_pipeline import chat_ids

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PROMPT = "Tell me about the history of the city of Paris."


class Contributors:
    """Contributor processes on a set of brokers; every one stopped by pid at the end."""

    def __init__(self, brokers: list[BrokerAddress], root: str, log_dir: Path) -> None:
        self.brokers, self.root, self.log_dir = brokers, root, log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, node_id: str, models_dir: Path | None = None) -> None:
        """Start a contributor; with `models_dir` (empty) it must fetch what it hosts."""
        models = models_dir or models_cache()
        cmd = [
            sys.executable, "-m", "jarvis_mqtt.cli", "--models-dir", str(models),
            "node", "--contribute", "--node-id", node_id, "--topic-root", self.root,
            "--broker", ",".join(map(str, self.brokers)), "--threads", "1",
        ]  # fmt: skip
        with (self.log_dir / f"{node_id}.log").open("ab") as out:
            self.procs[node_id] = subprocess.Popen(cmd, stdout=out, stderr=out)

    def stop(self) -> None:
        for p in self.procs.values():
            stop_pid(p.pid)
            p.wait()

    def log(self, node_id: str) -> str:
        return (self.log_dir / f"{node_id}.log").read_text(errors="replace")

    async def assign(self, spans: dict[str, list[tuple[str, int, int]]], plan: str) -> None:
        """Publish retained assignments as a planner would, with the manifests' hashes."""
        topics = T.Topics(self.root)
        async with MeshClient(self.brokers, client_id=f"planner-{uuid.uuid4().hex[:6]}") as mesh:
            for node, s in spans.items():
                hashes = tuple(
                    sorted({m: sha256_file(models_cache() / m / MANIFEST) for m, _, _ in s}.items())
                )
                payload = T.pack_assignment(T.Assignment(tuple(s), plan, hashes))
                await mesh.publish(topics.assign(node), payload, retain=True)


@pytest.fixture
def contributors(brokers: list, tmp_path: Path) -> Iterator[Callable[..., Contributors]]:  # type: ignore[type-arg]
    made: list[Contributors] = []

    def make(*ids: str) -> Contributors:
        c = Contributors([b.address for b in brokers], f"test/{uuid.uuid4().hex[:8]}", tmp_path)
        made.append(c)
        for i in ids:
            c.start(i)
        asyncio.run(wait_for_nodes(c.brokers, c.root, list(ids), 60))
        return c

    try:
        yield make
    finally:
        for c in made:
            c.stop()


def reference(md: ModelDir, n: int) -> list[int]:
    local = LocalModel(md)
    local.tokenizer.eos_token_ids = frozenset()
    return [
        e.token_id for e in local.generate(chat_ids(md, PROMPT), SamplingParams(max_new_tokens=n))
    ]


async def statuses(
    c: Contributors, ids: list[str], ok: Callable[[NodeStatus], bool] = lambda s: True
) -> dict[str, NodeStatus]:
    """The first status of each of `ids` that satisfies `ok`."""
    view = MeshView()
    async with MeshClient(c.brokers, client_id=f"look-{uuid.uuid4().hex[:6]}") as mesh:
        await mesh.subscribe(T.Topics(c.root).all_node_status())
        async with asyncio.timeout(30):
            async for m in mesh.messages():
                if m.payload:
                    view.update(T.unpack_status(m.payload))
                if all(i in view.nodes and ok(view.nodes[i]) for i in ids):
                    break
    return {i: view.nodes[i] for i in ids}


async def idle_capacity(c: Contributors, ids: list[str]) -> dict[str, dict[str, object]]:
    """The capacity each contributor announced."""
    return {i: dict(s.capacity) for i, s in (await statuses(c, ids)).items()}


def test_contributors_join_take_a_plan_and_rebalance_mid_chat(
    smollm2_dir: ModelDir, contributors: Callable[..., Contributors], tmp_path: Path
) -> None:
    n_tokens = 24
    want = reference(smollm2_dir, n_tokens)
    c = contributors("c1", "c2", "c3")
    caps = asyncio.run(idle_capacity(c, ["c1", "c2", "c3"]))
    for cap in caps.values():  # each measured and announced what it can offer
        assert int(cap["memory_bytes"]) > 0 and int(cap["cores"]) >= 1  # type: ignore[call-overload]
    model = smollm2_dir.name

    async def scenario() -> list[list[str]]:
        await c.assign(
            {"c1": [(model, 0, 10)], "c2": [(model, 10, 20)], "c3": [(model, 20, 30)]}, "p1"
        )
        remote = RemoteModel(smollm2_dir, c.brokers, topic_root=c.root, allow_skip=False)
        remote.tokenizer.eos_token_ids = frozenset()
        routes: list[list[str]] = []
        async with remote:
            await remote.wait_ready(60)
            params = SamplingParams(max_new_tokens=n_tokens)
            tokens = []
            async for ev in remote.generate(chat_ids(smollm2_dir, PROMPT), params):
                tokens.append(ev.token_id)
                routes.append([str(h["node"]) for h in ev.route])
                if len(tokens) == 6:
                    # A fourth device joins; the plan is redone over four while the chat goes on.
                    # It has no model files: it fetches its layers from the node hosting them.
                    await asyncio.to_thread(c.start, "c4", tmp_path / "c4-models")
                    await wait_for_nodes(c.brokers, c.root, ["c4"], 60)
                    await c.assign(
                        {
                            "c1": [(model, 0, 8)], "c2": [(model, 8, 16)],
                            "c3": [(model, 16, 23)], "c4": [(model, 23, 30)],
                        },
                        "p2",
                    )  # fmt: skip
            assert tokens == want  # nothing dropped or changed by the rebalance

            # The chat goes on; once the new plan is in place the next reply runs on it.
            def new_plan_in_place() -> bool:
                live = remote.view.live(model)
                c4_up = any(s.node_id.startswith("c4.") for s in live)
                return c4_up and not any(s.start == 20 for s in live)  # old c3 retired

            for _ in range(600):
                if new_plan_in_place():
                    break
                await asyncio.sleep(0.1)
            again = [e async for e in remote.generate(chat_ids(smollm2_dir, PROMPT), params)]
            assert [e.token_id for e in again] == want
            routes.append([str(h["node"]) for h in again[-1].route])
        return routes

    routes = asyncio.run(scenario())
    assert [n.split(".")[0] for n in routes[0]] == ["c1", "c2", "c3"]
    assert [n.split(".")[0] for n in routes[-1]] == ["c1", "c2", "c3", "c4"]
    # c4 fetched exactly its layers [23, 30), each checked, and served them.
    fetched = tmp_path / "c4-models" / model
    assert sorted(p.name for p in fetched.glob("layer_*")) == [
        f"layer_{i:03d}.safetensors" for i in range(23, 30)
    ]
    assert "fetching" in c.log("c4") and "fetched" in c.log("c4")


def test_two_models_on_one_mesh_one_device_hosting_both(
    smollm2_dir: ModelDir, gemma3_dir: ModelDir, contributors: Callable[..., Contributors]
) -> None:
    c = contributors("d1", "d2")
    small, gemma = smollm2_dir.name, gemma3_dir.name

    async def scenario() -> tuple[tuple[list[int], list[str]], tuple[list[int], list[str]]]:
        # d1 hosts layers of both models; d2 the rest of each.
        await c.assign(
            {"d1": [(small, 0, 15), (gemma, 0, 9)], "d2": [(small, 15, 30), (gemma, 9, 18)]}, "p"
        )
        a = RemoteModel(smollm2_dir, c.brokers, topic_root=c.root)
        b = RemoteModel(gemma3_dir, c.brokers, topic_root=c.root)
        params = SamplingParams(max_new_tokens=8)
        ids_a = chat_ids(smollm2_dir, PROMPT)
        ids_b = chat_ids(gemma3_dir, "Paris is the capital of")
        async with a, b:
            await a.wait_ready(60)
            await b.wait_ready(60)
            ra, rb = await asyncio.gather(_collect(a, ids_a, params), _collect(b, ids_b, params))
        return ra, rb

    (got_a, route_a), (got_b, route_b) = asyncio.run(scenario())
    params = SamplingParams(max_new_tokens=8)
    for md, got, prompt in (
        (smollm2_dir, got_a, PROMPT),
        (gemma3_dir, got_b, "Paris is the capital of"),
    ):
        local = LocalModel(md)
        assert got == [e.token_id for e in local.generate(chat_ids(md, prompt), params)]
    # One device served layers of both models.
    assert route_a[0].startswith(f"d1.{small}.") and route_b[0].startswith(f"d1.{gemma}.")
    # Each model's planner sees only the memory the other model leaves on d1.
    d1 = asyncio.run(statuses(c, ["d1"], lambda s: len(s.load.get("hosting", [])) == 2))["d1"]
    offered = int(d1.capacity["memory_bytes"])
    kv = int(d1.capacity["kv_budget_bytes"])
    small_bytes = smollm2_dir.shard_bytes(0, 15, include_stage=False) + kv
    gemma_bytes = gemma3_dir.shard_bytes(0, 9, include_stage=False) + kv
    assert leftover_capacity(d1, gemma)["memory_bytes"] == offered - small_bytes
    assert leftover_capacity(d1, small)["memory_bytes"] == offered - gemma_bytes


async def _collect(
    remote: RemoteModel, ids: list[int], params: SamplingParams
) -> tuple[list[int], list[str]]:
    events = [e async for e in remote.generate(ids, params)]
    return [e.token_id for e in events], [str(h["node"]) for h in events[-1].route]


def plan_cmd(c: Contributors, model: str, *flags: str) -> list[str]:
    """`jarvis plan --apply` over the contributors' mesh."""
    return [
        sys.executable, "-m", "jarvis_mqtt.cli", "--models-dir", str(models_cache()), "plan",
        "--model", model, "--apply", "--broker", ",".join(map(str, c.brokers)),
        "--topic-root", c.root, *flags,
    ]  # fmt: skip


def contributors_of(live: list[NodeStatus]) -> list[str]:
    """The devices behind hosted node ids (`e1.model.2` -> `e1`)."""
    return [s.node_id.split(".")[0] for s in live]


def test_plan_apply_places_the_model_and_the_watcher_rebalances_mid_chat(
    smollm2_dir: ModelDir, contributors: Callable[..., Contributors], tmp_path: Path
) -> None:
    n_tokens = 24
    want = reference(smollm2_dir, n_tokens)
    model = smollm2_dir.name
    c = contributors("e1", "e2", "e3")
    once = subprocess.run(
        plan_cmd(c, model), capture_output=True, text=True, timeout=180, check=False
    )
    assert once.returncode == 0, once.stderr
    for node in ("e1", "e2", "e3"):  # each told its span, and the output says so
        assert f"  {node}: {model} [" in once.stdout, once.stdout
    watch_log = tmp_path / "watch.log"
    with watch_log.open("wb") as out:
        watcher = subprocess.Popen(
            plan_cmd(c, model, "--watch", "--debounce", "2"), stdout=out, stderr=out
        )
    try:
        # The watcher first re-plans over the three in place and publishes nothing; only then
        # may e4 join (on a slow machine its start-up can outlast the chat's first tokens).
        deadline = time.monotonic() + 120
        while "unchanged" not in watch_log.read_text() and time.monotonic() < deadline:
            assert watcher.poll() is None, watch_log.read_text()
            time.sleep(0.2)
        assert "unchanged" in watch_log.read_text(), watch_log.read_text()
        routes = asyncio.run(_chat_through_a_join(c, smollm2_dir, want, n_tokens, tmp_path))
    finally:
        stop_pid(watcher.pid)
        watcher.wait()
    log = watch_log.read_text()
    assert "  e4: " in log, log  # then the join: e4 given a span
    assert sorted(routes[0]) == ["e1", "e2", "e3"]
    assert sorted(routes[-1]) == ["e1", "e2", "e3", "e4"]
    assert list((tmp_path / "e4-models" / model).glob("layer_*")), c.log("e4")


async def _chat_through_a_join(
    c: Contributors, md: ModelDir, want: list[int], n_tokens: int, tmp_path: Path
) -> list[list[str]]:
    """A chat during which `e4` joins and the watcher re-plans; each reply's route."""
    remote = RemoteModel(md, c.brokers, topic_root=c.root, allow_skip=False)
    remote.tokenizer.eos_token_ids = frozenset()
    params = SamplingParams(max_new_tokens=n_tokens)
    routes: list[list[str]] = []

    async def until(ok: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not ok():  # noqa: ASYNC110 - a view updated by the client's own task
                await asyncio.sleep(0.1)

    async with remote:
        await remote.wait_ready(60)
        tokens = []
        async for ev in remote.generate(chat_ids(md, PROMPT), params):
            tokens.append(ev.token_id)
            if len(tokens) == 1:
                routes.append([str(h["node"]).split(".")[0] for h in ev.route])
            if len(tokens) == 6:
                # A fourth device joins; the watcher re-plans over four while the chat waits
                # for e4's span to come up, then goes on during the switch.
                # e4 has no files: the plan's manifest hash lets it fetch and check them.
                await asyncio.to_thread(c.start, "e4", tmp_path / "e4-models")
                await wait_for_nodes(c.brokers, c.root, ["e4"], 60)
                await until(lambda: "e4" in contributors_of(remote.view.live(md.name)), 120)
        assert tokens == want  # nothing dropped or changed by the rebalance

        def new_plan_in_place() -> bool:  # four spans, one per device: old ones retired
            return sorted(contributors_of(remote.view.live(md.name))) == ["e1", "e2", "e3", "e4"]

        await until(new_plan_in_place, 150)
        again = [e async for e in remote.generate(chat_ids(md, PROMPT), params)]
        assert [e.token_id for e in again] == want
        routes.append([str(h["node"]).split(".")[0] for h in again[-1].route])
    return routes
