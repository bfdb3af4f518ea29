"""Recognising the second copy of a message: every broker of the mesh delivers one."""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable

from jarvis_mqtt import wire

DedupKey = Callable[[str, bytes], bytes | None]


def default_dedup_key(topic: str, payload: bytes) -> bytes | None:
    """A hash of the topic and, for a wire message, its header (which holds the random `mid`,
    so the tensor bytes need not be read), else of the whole payload.

    Hashing content means a retained status that changed is a new message, and the same
    content delivered again (another broker, a reconnect) is a duplicate.
    """
    digest = hashlib.blake2b(topic.encode(), digest_size=16)
    digest.update(b"\0")
    digest.update(_header_or_all(payload))
    return digest.digest()


def _header_or_all(payload: bytes) -> bytes | memoryview:
    if payload[: len(wire.MAGIC)] == wire.MAGIC and len(payload) >= wire.PREFIX_BYTES:
        size = int.from_bytes(payload[len(wire.MAGIC) : wire.PREFIX_BYTES], "big")
        if (end := wire.PREFIX_BYTES + size) <= len(payload):
            return memoryview(payload)[:end]
    return payload


class RecentKeys:
    """The last `size` keys seen, in O(1) per key and bounded memory."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("dedup window must hold at least one key")
        self._order: collections.deque[bytes] = collections.deque()
        self._keys: set[bytes] = set()
        self._size = size

    def add(self, key: bytes) -> bool:
        """Remember `key`; False if it was already among the recent ones."""
        if key in self._keys:
            return False
        if len(self._order) == self._size:
            self._keys.discard(self._order.popleft())
        self._order.append(key)
        self._keys.add(key)
        return True

    def __len__(self) -> int:
        return len(self._keys)
