"""Generation through real brokers and real node processes against the single-process reference."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import torch

from jarvis_mqtt import topics as T
from jarvis_mqtt import wire
from jarvis_mqtt.checkpoint import ModelDir
from jarvis_mqtt.client import RemoteModel
from jarvis_mqtt.errors import MeshError
from jarvis_mqtt.generate import LocalModel
from jarvis_mqtt.mesh import LocalMesh
from jarvis_mqtt.sampling import SamplingParams
from jarvis_mqtt.transport import MeshClient
from tests.fixtures_models import models_cache

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write a haiku about the sea.",
    "What is 12 plus 30?",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.",
    "What do bees make?",
    "Say hello in Spanish.",
]
NEW_TOKENS = 24


def chat_ids(md: ModelDir, prompt: str) -> list[int]:
    tok = md.tokenizer()
    if md.family == "gemma3":  # the packaged Gemma 3 is the base model: plain text, no chat
        return list(tok.encode(prompt))
    text = tok.apply_chat_template([{"role": "user", "content": prompt}])
    return list(tok.encode(text, add_special_tokens=False))


def reference(md: ModelDir, prompts: list[str], n: int = NEW_TOKENS) -> dict[str, list[int]]:
    local = LocalModel(md)
    params = SamplingParams(max_new_tokens=n)
    return {p: [e.token_id for e in local.generate(chat_ids(md, p), params)] for p in prompts}


def start_mesh(md: ModelDir, run_dir: Path, nodes: int, **kw: object) -> LocalMesh:
    root = f"test/{uuid.uuid4().hex[:8]}"
    return LocalMesh(
        md.name, nodes=nodes, brokers=2, run_dir=run_dir, models_dir=models_cache(),
        topic_root=root, **kw,  # type: ignore[arg-type]
    ).start()  # fmt: skip


@pytest.fixture(scope="module")
def smol_mesh(
    smollm2_dir: ModelDir, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalMesh]:
    """Six nodes and two brokers serving SmolLM2; a 1 MiB payload limit for the bad-input test."""
    mesh = start_mesh(
        smollm2_dir, tmp_path_factory.mktemp("mesh"), 6, node_args=["--max-payload-mb", "1"]
    )
    try:
        yield mesh
    finally:
        mesh.stop()


async def remote_generate(
    md: ModelDir, mesh: LocalMesh, prompt: str, n: int = NEW_TOKENS
) -> list[int]:
    async with RemoteModel(md, mesh.addresses, topic_root=mesh.topic_root) as remote:
        await remote.wait_ready(30)
        params = SamplingParams(max_new_tokens=n)
        return [e.token_id async for e in remote.generate(chat_ids(md, prompt), params)]


def test_six_nodes_two_brokers_token_identical_smollm2(
    smollm2_dir: ModelDir, smol_mesh: LocalMesh
) -> None:
    want = reference(smollm2_dir, PROMPTS[:1])[PROMPTS[0]]
    got = asyncio.run(remote_generate(smollm2_dir, smol_mesh, PROMPTS[0]))
    assert got == want
    assert "Paris" in smollm2_dir.tokenizer().decode(got)


def test_six_nodes_two_brokers_token_identical_gemma3(gemma3_dir: ModelDir, tmp_path: Path) -> None:
    want = reference(gemma3_dir, PROMPTS[:1])[PROMPTS[0]]
    mesh = start_mesh(gemma3_dir, tmp_path, 6)
    try:
        got = asyncio.run(remote_generate(gemma3_dir, mesh, PROMPTS[0]))
    finally:
        mesh.stop()
    assert got == want


def test_eight_chat_clients_at_once(smollm2_dir: ModelDir, smol_mesh: LocalMesh) -> None:
    """Eight jarvis-chat processes at once; each gets the answer to its own prompt."""
    want = reference(smollm2_dir, PROMPTS, n=16)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "user_client.chat",
                "--model",
                smollm2_dir.name,
                "--models-dir",
                str(models_cache()),
                "--broker",
                smol_mesh.broker_arg,
                "--topic-root",
                smol_mesh.topic_root,
                "-p",
                p,
                "-n",
                "16",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in PROMPTS
    ]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for prompt, proc, (out, err) in zip(PROMPTS, procs, outs, strict=True):
        assert proc.returncode == 0, err
        reply = json.loads(out.strip().splitlines()[-1])
        assert reply["token_ids"] == want[prompt], prompt
        assert [h["node"] for h in reply["route"][0]] == [f"node-{i}" for i in range(6)]


def test_sessions_stepping_together_share_forward_steps(
    smollm2_dir: ModelDir, smol_mesh: LocalMesh
) -> None:
    """Four sessions of one client decode at once: each node runs their steps together (the
    heartbeat counters say how many forward steps it took for how many rows), and each
    session still gets its own answer."""
    prompts, n = PROMPTS[:4], 12
    want = reference(smollm2_dir, prompts, n=n)

    def counters(remote: RemoteModel) -> dict[str, tuple[int, int]]:
        return {
            s.node_id: (int(s.load.get("steps", 0)), int(s.load.get("tokens", 0)))
            for s in remote.view.live(remote.model)
        }

    async def heartbeat_after(remote: RemoteModel, t: float) -> dict[str, tuple[int, int]]:
        async with asyncio.timeout(10):
            # Polled: the view changes with every heartbeat of any node.
            while not all(s.time > t for s in remote.view.live(remote.model)):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        return counters(remote)

    async def main() -> tuple[dict[str, list[int]], dict[str, tuple[int, int]], int]:
        """(answers, (steps, rows) per node over the run, the prompts' rows)"""
        async with RemoteModel(
            smollm2_dir, smol_mesh.addresses, topic_root=smol_mesh.topic_root
        ) as remote:
            await remote.wait_ready(30)
            before = await heartbeat_after(remote, time.time())
            params = SamplingParams(max_new_tokens=n)
            ids = {p: chat_ids(smollm2_dir, p) for p in prompts}

            async def one(p: str) -> list[int]:
                return [e.token_id async for e in remote.generate(ids[p], params)]

            got = await asyncio.gather(*(one(p) for p in prompts))
            after = await heartbeat_after(remote, time.time())
            delta = {k: (after[k][0] - v[0], after[k][1] - v[1]) for k, v in before.items()}
            prompt_rows = sum(len(i) for i in ids.values())
            return dict(zip(prompts, got, strict=True)), delta, prompt_rows

    got, delta, prompt_rows = asyncio.run(main())
    assert got == want
    decode_rows = sum(len(t) - 1 for t in got.values())  # every token but the last is fed back
    assert len(delta) == 6
    for node, (steps, rows) in delta.items():
        assert rows == prompt_rows + decode_rows, node
        # One step per row alone (4 prompts + 40-odd decode rows); together, about 4 + 11.
        assert steps <= len(prompts) + decode_rows // 2, (node, steps)


def _raw(header: dict[str, object], body: bytes = b"") -> bytes:
    # A fresh message id each time: the mesh drops repeated ids as duplicates.
    h = msgpack.packb({**header, "mid": T.new_message_id()})
    return b"JV" + len(h).to_bytes(4, "big") + h + body


def test_bad_input_is_answered_and_node_keeps_serving(
    smollm2_dir: ModelDir, smol_mesh: LocalMesh
) -> None:
    hidden = int(smollm2_dir.config["hidden_size"])
    topics = T.Topics(smol_mesh.topic_root)
    cid = T.ClientId("badclient")
    node, model = "node-1", smollm2_dir.name
    target = topics.node_layer(model, 5, node)

    def act(**over: object) -> wire.ActivationMessage:
        fields: dict[str, object] = dict(
            sid=T.SessionId("s-" + uuid.uuid4().hex[:6]), cid=cid, model=model, step=0, pos=0,
            layer=5,
        )  # fmt: skip
        fields.update(over)
        return wire.ActivationMessage.from_tensor(torch.zeros(2, hidden), **fields)

    good = act()
    header = good._header()
    cases: dict[str, bytes] = {
        "malformed msgpack": b"JV\x00\x00\x00\x04\xc1\xc1\xc1\xc1",
        "unknown version": _raw({**header, "v": 99}, bytes(good.data)),
        "wrong shape": wire.encode(
            wire.ActivationMessage.from_tensor(torch.zeros(2, hidden + 1), **_fields(good))
        ),
        "wrong dtype": _raw({**header, "dtype": "int8"}, bytes(good.data)),
        "unknown session": wire.encode(act(pos=7)),
        "over the size limit": wire.encode(
            wire.ActivationMessage.from_tensor(torch.zeros(600, hidden), **_fields(act()))
        ),
        "layer not hosted": wire.encode(act(layer=0)),
        # Two messages in one bundle (how a node passes on a wave): each answered on its own.
        "bundle of two bad": wire.bundle([wire.encode(act(layer=1)), wire.encode(act(layer=2))]),
        "broken bundle": b"JB\x00\x00\x00\x02\x00\x00\x00\x05",
    }
    answered = len(cases) - 3 + 1  # errors: see the asserts below

    async def scenario() -> tuple[list[wire.ErrorMessage], list[T.Ack]]:
        errors: list[wire.ErrorMessage] = []
        acks: list[T.Ack] = []
        async with MeshClient(smol_mesh.addresses, client_id="jarvis-badclient") as mesh:
            await mesh.subscribe(topics.client_result(cid))
            await mesh.subscribe(topics.ack(cid))
            for payload in cases.values():
                await mesh.publish(target, payload)
            try:
                async with asyncio.timeout(5):
                    async for m in mesh.messages():
                        if isinstance(topics.parse(m.topic), T.AckTopic):
                            acks.extend(T.unpack_ack(p) for p in wire.unbundle(m.payload))
                        else:
                            msg = wire.decode(m.payload, max_bytes=1 << 24)
                            assert isinstance(msg, wire.ErrorMessage)
                            errors.append(msg)
                        if len(errors) + len(acks) == answered + 1:
                            break
            except TimeoutError:
                pass
        return errors, acks

    errors, acks = asyncio.run(scenario())
    texts = "\n".join(e.text for e in errors)
    # Every case that names its client is answered, the bundle once per message; the malformed
    # message and the broken bundle cannot be, and the unknown session is acknowledged.
    assert len(errors) == answered, texts
    for needle in ("version", "shape", "dtype", "over the limit", "layer 0", "layer 1", "layer 2"):
        assert needle in texts, needle
    # A session the node does not hold is not an error: it asks its sender for a replay.
    assert [(a.by, a.need_from) for a in acks] == [(node, 0)]
    log = Path(smol_mesh.node(node).log).read_text()
    assert log.count("not valid msgpack") == 1  # logged once
    assert log.count("refused a bundle") == 1
    # And the node still serves a normal generation, correctly.
    got = asyncio.run(remote_generate(smollm2_dir, smol_mesh, PROMPTS[4], n=8))
    assert got == reference(smollm2_dir, [PROMPTS[4]], n=8)[PROMPTS[4]]


def _fields(m: wire.ActivationMessage) -> dict[str, object]:
    return dict(sid=m.sid, cid=m.cid, model=m.model, step=m.step, pos=m.pos, layer=m.layer)


def test_missing_layers_named_with_timeout(smollm2_dir: ModelDir, tmp_path: Path) -> None:
    mesh = LocalMesh(
        smollm2_dir.name, nodes=1, spans=[(0, 10)], run_dir=tmp_path,
        models_dir=models_cache(), topic_root=f"test/{uuid.uuid4().hex[:8]}",
    ).start()  # fmt: skip
    try:

        async def go() -> None:
            async with RemoteModel(smollm2_dir, mesh.addresses, topic_root=mesh.topic_root) as r:
                await r.wait_ready(2)

        with pytest.raises(Exception, match=r"no live node hosts layers 10-29"):
            asyncio.run(go())
    finally:
        mesh.stop()


def test_local_mesh_keeps_track_of_every_process(smol_mesh: LocalMesh) -> None:
    """Runs last in this module: it restarts a node of the shared mesh."""
    with pytest.raises(MeshError, match="already started"):
        smol_mesh.start()  # a second start must not orphan the processes of the first
    old = smol_mesh.node("node-5")
    new = smol_mesh.start_node("node-5", old.start, old.end)  # a restart stops the old one
    with pytest.raises(ProcessLookupError):  # stopped and reaped
        os.kill(old.pid, 0)
    assert new.pid != old.pid
    smol_mesh.wait_ready(["node-5"])
    assert [n.node_id for n in smol_mesh.nodes].count("node-5") == 1
