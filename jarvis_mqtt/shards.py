"""Layer files over MQTT: nodes serve their model directory; a contributor fetches what it lacks.

    FileServer(model_dir)                 -> answers `FileRequest`s from one model directory
    ShardFetcher(brokers, topics, me)     -> async context manager; `await f.fetch(...)`

A contributor assigned layers it has no files for asks the nodes that host them, one piece of
`CHUNK` bytes at a time with `WINDOW` pieces in flight, and writes each file beside its final
name. Trust runs from the assignment: the planner names the sha256 of its `manifest.json`, a
fetched manifest must have that hash, and each fetched file must have the hash its manifest
gives; a source that sends anything else is logged and the next one tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from jarvis_mqtt import topics as T
from jarvis_mqtt.brokers import BrokerAddress
from jarvis_mqtt.checkpoint import MANIFEST, ModelDir, sha256_file
from jarvis_mqtt.errors import CheckpointError, JarvisError, WireError
from jarvis_mqtt.membership import MeshView, NodeStatus
from jarvis_mqtt.transport import MeshClient

log = logging.getLogger(__name__)

CHUNK = 256 << 10  # bytes asked for at once
WINDOW = 8  # pieces in flight from one source
PIECE_TIMEOUT = 5.0  # seconds a source may take to answer one piece (asked twice)
SOURCES_TIMEOUT = 10.0  # seconds to wait for a live node that could have a file
MAX_ANSWERING = 32  # pieces a node reads and sends at once; more requests wait
MAX_MANIFEST = 16 << 20  # bytes; a manifest is a few KiB


class FileServer:
    """Pieces of the files of one model directory, for whoever asks."""

    def __init__(self, md: ModelDir, name: str = "") -> None:
        self.model_dir = md.path
        self.model = md.name
        self.files = frozenset([MANIFEST, *md.manifest["files"]])  # what may be asked for
        self.name = name  # who serves, for the log
        self._slots = asyncio.Semaphore(MAX_ANSWERING)
        self._answering: set[asyncio.Task[None]] = set()

    async def offer(self, mesh: MeshClient, topics: T.Topics, payload: bytes) -> None:
        """Take one request off the receive loop: answered by a task, `MAX_ANSWERING` at once."""
        try:
            req = T.unpack_file_request(payload)
        except WireError as e:
            log.warning("%s: bad file request: %s", self.name, e)
            return
        await self._slots.acquire()  # back-pressure: an asker has only a few in flight

        async def reply() -> None:
            try:
                chunk = await self.answer(req)
                if chunk.error:
                    log.warning("%s: file request refused: %s", self.name, chunk.error)
                with contextlib.suppress(JarvisError):
                    await mesh.publish(topics.file_data(req.reply), T.pack_file_chunk(chunk))
            finally:
                self._slots.release()

        task = asyncio.create_task(reply(), name=f"file {req.file}@{req.offset}")
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def answer(self, req: T.FileRequest) -> T.FileChunk:
        """The piece `req` asks for, or a chunk whose `error` says why not."""
        if req.model != self.model:
            return T.FileChunk(req.rid, error=f"model {req.model!r} is not served here")
        if req.file not in self.files:
            return T.FileChunk(req.rid, error=f"{req.file}: not a file of {self.model}")
        try:
            size, data = await asyncio.to_thread(_read, self.model_dir / req.file, req)
        except OSError as e:
            return T.FileChunk(req.rid, error=f"{req.file}: not here ({e.strerror})")
        return T.FileChunk(req.rid, req.offset, size, data)


def _read(path: Path, req: T.FileRequest) -> tuple[int, bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.fstat(fd).st_size, os.pread(fd, req.length, req.offset)
    finally:
        os.close(fd)


class SourceError(JarvisError):
    """One source could not supply a file; another may."""


class ShardFetcher:
    """Fetches files of models from the nodes that host them; an async context manager.

    It has its own connection (named `me`), so answers keep flowing while the caller's own
    message loop waits for a fetch to finish.
    """

    def __init__(
        self,
        brokers: Sequence[BrokerAddress],
        topics: T.Topics,
        me: str,
        *,
        chunk: int = CHUNK,
        window: int = WINDOW,
        piece_timeout: float = PIECE_TIMEOUT,
        sources_timeout: float = SOURCES_TIMEOUT,
    ) -> None:
        self.topics, self.me = topics, T.check_name(me, "fetcher name")
        self.chunk = min(chunk, T.MAX_FILE_CHUNK)
        self.window, self.piece_timeout = window, piece_timeout
        self.sources_timeout = sources_timeout
        self.view = MeshView()
        self.fetched_bytes = 0
        self._mesh = MeshClient(brokers, client_id=f"jarvis-{me}", max_payload=2 * T.MAX_FILE_CHUNK)
        self._waiting: dict[str, asyncio.Future[T.FileChunk]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._seen = asyncio.Event()  # set on every status change

    async def __aenter__(self) -> Self:
        await self._mesh.__aenter__()
        try:
            await self._mesh.subscribe(self.topics.file_data(self.me))
            await self._mesh.subscribe(self.topics.all_node_status(), qos=T.NODE_STATUS.qos)
        except BaseException:
            await self._mesh.__aexit__(None, None, None)
            raise
        self._reader = asyncio.create_task(self._read(), name=f"{self.me} reader")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._mesh.__aexit__(et, e, tb)

    async def _read(self) -> None:
        async for m in self._mesh.messages():
            try:
                parsed = self.topics.parse(m.topic)
                if isinstance(parsed, T.NodeStatusTopic):
                    T.fold_status(self.view, parsed, m.payload)
                    self._seen.set()
                elif isinstance(parsed, T.FileDataTopic):
                    chunk = T.unpack_file_chunk(m.payload)
                    fut = self._waiting.pop(chunk.rid, None)
                    if fut is not None and not fut.done():
                        fut.set_result(chunk)
            except WireError as e:
                log.warning("%s: ignored %s: %s", self.me, m.topic, e)

    # -- what to fetch ---------------------------------------------------------------------------

    async def ensure(
        self, dest: Path, model: str, manifest_sha256: str | None, start: int, end: int
    ) -> ModelDir:
        """`dest` holding a verified manifest and the files of layers `[start, end)` of `model`.

        What is already there and matches is kept; the rest is fetched. Without a manifest
        hash only a local directory can do (nothing fetched can be trusted).
        """
        dest = Path(dest)
        local = _open_if_matches(dest, manifest_sha256)
        if local is None:
            if manifest_sha256 is None:
                raise CheckpointError(
                    f"{model}: not in {dest.parent}, and the assignment gives no manifest hash "
                    "to check a fetched copy against"
                )
            dest.mkdir(parents=True, exist_ok=True)
            await self.fetch_file(dest, model, MANIFEST, manifest_sha256, None, layer=None)
            local = ModelDir.open(dest)
        for index, name in await asyncio.to_thread(_missing, local, start, end):
            entry = local.manifest["files"][name]
            await self.fetch_file(dest, model, name, entry["sha256"], entry["bytes"], index)
        return local

    def sources(self, model: str, layer: int | None) -> list[NodeStatus]:
        """Live nodes of `model` that may have a file: those hosting `layer` first."""
        live = [s for s in self.view.live(model) if not s.idle]
        if layer is not None:
            live.sort(key=lambda s: not s.covers(layer))
        return live

    async def fetch_file(
        self, dest: Path, model: str, name: str, sha256: str, size: int | None, layer: int | None
    ) -> None:
        """Fetch `name` into `dest` from the first source that sends it intact."""
        tried: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.sources_timeout
        while True:
            fresh = [s for s in self.sources(model, layer) if s.node_id not in tried]
            if not fresh:
                if loop.time() >= deadline:
                    break
                self._seen.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._seen.wait(), deadline - loop.time())
                continue
            source = fresh[0].node_id
            tried.append(source)
            part = dest / f".{name}.part-{os.getpid()}"
            try:
                got = await self._download(source, model, name, size, part)
                if got != sha256:
                    raise SourceError(f"sha256 mismatch (expected {sha256}, got {got})")
                self.fetched_bytes += part.stat().st_size
                part.replace(dest / name)
                log.info("%s: fetched %s/%s from %s", self.me, model, name, source)
                return
            except SourceError as e:
                log.warning("%s: %s/%s from %s: %s", self.me, model, name, source, e)
            finally:
                part.unlink(missing_ok=True)
        raise CheckpointError(
            f"{name}: no node could supply it for {model}"
            + (f" (tried {', '.join(tried)})" if tried else " (no live node hosts it)")
        )

    async def _download(
        self, source: str, model: str, name: str, size: int | None, part: Path
    ) -> str:
        """Write `name` from `source` to `part`, `WINDOW` pieces at a time; its sha256."""
        digest = hashlib.sha256()
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if size is None:  # the manifest: the first piece tells its size
                first = await self._piece(source, model, name, 0, self.chunk)
                size = first.size
                if size > MAX_MANIFEST:
                    raise SourceError(f"a manifest of {size} bytes")
                await asyncio.to_thread(os.pwrite, fd, first.data, 0)
                digest.update(first.data)
                offset = len(first.data)
            else:
                offset = 0
            want = size
            pending: list[asyncio.Task[T.FileChunk]] = []
            next_offset = offset
            while offset < want:
                while len(pending) < self.window and next_offset < want:
                    n = min(self.chunk, want - next_offset)
                    pending.append(
                        asyncio.create_task(self._piece(source, model, name, next_offset, n))
                    )
                    next_offset += n
                try:
                    piece = await pending.pop(0)  # in order: the digest needs them so
                except BaseException:
                    for t in pending:
                        t.cancel()
                    raise
                if piece.size != want:
                    for t in pending:
                        t.cancel()
                    raise SourceError(f"has {piece.size} bytes, the manifest says {want}")
                await asyncio.to_thread(os.pwrite, fd, piece.data, piece.offset)
                digest.update(piece.data)
                offset += len(piece.data)
            return digest.hexdigest()
        finally:
            os.close(fd)

    async def _piece(self, source: str, model: str, name: str, offset: int, n: int) -> T.FileChunk:
        """One piece, asked twice before the source counts as gone."""
        for _ in range(2):
            rid = T.new_message_id()
            fut: asyncio.Future[T.FileChunk] = asyncio.get_running_loop().create_future()
            self._waiting[rid] = fut
            req = T.FileRequest(rid, model, name, offset, n, self.me)
            try:
                await self._mesh.publish(self.topics.file_get(source), T.pack_file_request(req))
                chunk = await asyncio.wait_for(fut, self.piece_timeout)
            except TimeoutError:
                continue
            finally:
                self._waiting.pop(rid, None)
            if chunk.error:
                raise SourceError(chunk.error)
            if chunk.offset != offset or len(chunk.data) != min(n, max(chunk.size - offset, 0)):
                raise SourceError(f"sent {len(chunk.data)} bytes at {chunk.offset} for {offset}")
            return chunk
        raise SourceError(f"no answer for {n} bytes at {offset} within {self.piece_timeout} s")


def _open_if_matches(dest: Path, manifest_sha256: str | None) -> ModelDir | None:
    """The model directory at `dest` if it has the wanted manifest (any, when None)."""
    try:
        if manifest_sha256 is not None and sha256_file(dest / MANIFEST) != manifest_sha256:
            return None
        return ModelDir.open(dest)
    except (OSError, JarvisError):
        return None


def _missing(local: ModelDir, start: int, end: int) -> list[tuple[int, str]]:
    """(layer, file name) of the layers in `[start, end)` whose file is absent or damaged."""
    missing = []
    for index, name in zip(range(start, end), local.layer_files(start, end), strict=True):
        try:
            local.file(name)
        except CheckpointError:
            missing.append((index, name))
    return missing


def have_files(dest: Path, manifest_sha256: str | None, start: int, end: int) -> bool:
    """Whether `dest` has the wanted manifest and intact files of layers `[start, end)`."""
    local = _open_if_matches(dest, manifest_sha256)
    return local is not None and not _missing(local, start, end)
