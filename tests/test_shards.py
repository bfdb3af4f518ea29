"""Layer files over MQTT: fetched piece by piece from nodes that host them, checked by sha256."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jarvis_mqtt import topics as T
from jarvis_mqtt.brokers import BrokerAddress
from jarvis_mqtt.checkpoint import MANIFEST, ModelDir, sha256_file
from jarvis_mqtt.client import wait_for_nodes
from jarvis_mqtt.errors import CheckpointError
from jarvis_mqtt.mesh import stop_pid
from jarvis_mqtt.shards import ShardFetcher, have_files

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def linked_copy(md: ModelDir, root: Path) -> Path:
    """A model directory under `root` sharing the files of `md` (hard links, no copies)."""
    dest = root / md.name
    dest.mkdir(parents=True)
    for p in md.path.iterdir():
        if p.is_file():
            os.link(p, dest / p.name)
    return dest


def corrupt(path: Path) -> None:
    """Replace `path` by a copy of the same size with a few bytes flipped in its middle."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(bytes(data))
    tmp.replace(path)  # a new inode: a node that mapped the old file keeps serving it


@pytest.fixture
def nodes(
    brokers: list, topic_root: str, tmp_path: Path
) -> Iterator[Callable[[str, ModelDir, Path, tuple[int, int]], None]]:  # type: ignore[type-arg]
    """Start node processes serving a span from a given models directory; stopped by pid."""
    procs: list[subprocess.Popen[bytes]] = []
    addresses: list[BrokerAddress] = [b.address for b in brokers]

    def start(node_id: str, md: ModelDir, models_dir: Path, span: tuple[int, int]) -> None:
        cmd = [
            sys.executable, "-m", "jarvis_mqtt.cli", "--models-dir", str(models_dir), "node",
            "--model", md.name, "--layers", f"{span[0]}:{span[1]}", "--node-id", node_id,
            "--topic-root", topic_root, "--broker", ",".join(map(str, addresses)),
            "--threads", "1",
        ]  # fmt: skip
        with (tmp_path / f"{node_id}.log").open("ab") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=out))
        asyncio.run(wait_for_nodes(addresses, topic_root, [node_id], 60))

    try:
        yield start
    finally:
        for p in procs:
            stop_pid(p.pid)
            p.wait()


def test_fetch_checks_each_file_and_moves_past_a_bad_source(
    smollm2_dir: ModelDir,
    brokers: list,  # type: ignore[type-arg]
    topic_root: str,
    nodes: Callable[[str, ModelDir, Path, tuple[int, int]], None],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    md, model = smollm2_dir, smollm2_dir.name
    manifest = sha256_file(md.path / MANIFEST)
    addresses = [b.address for b in brokers]
    # "bad" hosts layers 4 and 5, then its copy of layer 5 on disk goes bad; "good" hosts
    # layers 0..3 from a complete directory. Sources are asked hosts-first: bad, then good.
    bad_dir = tmp_path / "bad"
    linked_copy(md, bad_dir)
    nodes("bad", md, bad_dir, (4, 6))
    nodes("good", md, md.path.parent, (0, 4))
    corrupt(bad_dir / model / "layer_005.safetensors")

    async def fetch(dest: Path, sha: str, start: int, end: int) -> tuple[ModelDir, int]:
        topics = T.Topics(topic_root)
        async with ShardFetcher(addresses, topics, "fetcher", sources_timeout=2.0) as f:
            got = await f.ensure(dest, model, sha, start, end)
            return got, f.fetched_bytes

    dest = tmp_path / "fetched" / model
    with caplog.at_level(logging.WARNING, logger="jarvis_mqtt.shards"):
        got, fetched = asyncio.run(fetch(dest, manifest, 4, 6))
    assert got.path == dest and have_files(dest, manifest, 4, 6)
    names = [MANIFEST, "layer_004.safetensors", "layer_005.safetensors"]
    assert fetched == sum((md.path / n).stat().st_size for n in names)  # nothing twice
    for name in names:
        assert sha256_file(dest / name) == sha256_file(md.path / name)
    assert not (dest / "layer_006.safetensors").exists()  # only the span asked for
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # no partial files left
    bad = [r.getMessage() for r in caplog.records if "sha256 mismatch" in r.getMessage()]
    assert len(bad) == 1 and "layer_005" in bad[0] and "from bad" in bad[0], bad

    # A file present and intact is kept; a damaged one is fetched again.
    corrupt(dest / "layer_004.safetensors")
    assert not have_files(dest, manifest, 4, 6)
    _, fetched = asyncio.run(fetch(dest, manifest, 4, 6))
    assert fetched == (md.path / "layer_004.safetensors").stat().st_size
    assert have_files(dest, manifest, 4, 6)

    # A manifest the planner did not name is refused from every source.
    with pytest.raises(CheckpointError, match=r"manifest.json: no node could supply it"):
        asyncio.run(fetch(tmp_path / "other" / model, "0" * 64, 4, 5))


def test_fetch_fails_clearly_when_only_a_bad_copy_exists(
    smollm2_dir: ModelDir,
    brokers: list,  # type: ignore[type-arg]
    topic_root: str,
    nodes: Callable[[str, ModelDir, Path, tuple[int, int]], None],
    tmp_path: Path,
) -> None:
    md, model = smollm2_dir, smollm2_dir.name
    bad_dir = tmp_path / "bad"
    linked_copy(md, bad_dir)
    nodes("bad", md, bad_dir, (29, 30))
    corrupt(bad_dir / model / "layer_029.safetensors")
    topics = T.Topics(topic_root)

    async def fetch() -> None:
        addresses = [b.address for b in brokers]
        async with ShardFetcher(addresses, topics, "fetcher", sources_timeout=1.0) as f:
            sha = sha256_file(md.path / MANIFEST)
            await f.ensure(tmp_path / "dest" / model, model, sha, 28, 30)

    with pytest.raises(CheckpointError, match=r"layer_029.safetensors: no node .*\(tried bad\)"):
        asyncio.run(fetch())
    # Layer 28 came from the same node intact; the bad layer 29 left nothing behind.
    dest = tmp_path / "dest" / model
    assert have_files(dest, None, 28, 29) and not (dest / "layer_029.safetensors").exists()
    shutil.rmtree(tmp_path / "dest")
