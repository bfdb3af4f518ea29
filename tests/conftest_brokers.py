"""Pytest plugin: real Mosquitto brokers for integration tests, and a topic root per test.

Registered with `pytest_plugins = ["tests.conftest_brokers"]` (or `-p tests.conftest_brokers`).
A Mosquitto container is used when a Docker engine answers; otherwise the local `mosquitto`
binary runs on a free port. Either way every broker is stopped in teardown, pass or fail.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from jarvis_mqtt.brokers import BrokerAddress, MosquittoBroker, free_port, render_config
from jarvis_mqtt.errors import MeshError


class Broker(Protocol):
    """What a test may do with a broker."""

    @property
    def address(self) -> BrokerAddress: ...

    @property
    def pid(self) -> int: ...

    def kill(self) -> None: ...

    def restart(self) -> Any: ...


@functools.cache
def docker_available() -> bool:
    """Whether a Docker engine answers a ping within 2 s (checked once per session)."""
    host = os.environ.get("DOCKER_HOST", "")
    if not host and not Path("/var/run/docker.sock").exists():
        return False  # no engine configured: do not let the client probe and hang
    try:
        import docker  # only needed when an engine may exist

        client = docker.from_env(timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # docker raises many unrelated types for "not reachable"
        return False


class ContainerBroker:
    """A Mosquitto container on a fixed host port, so a restart keeps its address."""

    def __init__(self, run_dir: Path) -> None:
        from testcontainers.community.mqtt import MosquittoContainer

        self._port = free_port()
        self._container = MosquittoContainer().with_bind_ports(1883, self._port)
        # The mesh config (TCP_NODELAY above all), not the image's default one.
        run_dir.mkdir(parents=True, exist_ok=True)
        self._conf = run_dir / "mosquitto.conf"
        self._conf.write_text(
            # stdout: testcontainers waits for the "running" line in the container log.
            render_config(port=1883, log_file=None, user="mosquitto")
        )

    def start(self) -> ContainerBroker:
        """Start the container and wait for its log line."""
        self._container.start(configfile=str(self._conf))
        return self

    @property
    def address(self) -> BrokerAddress:
        """Where the container's broker listens on this host."""
        return BrokerAddress(self._container.get_container_host_ip(), self._port)

    @property
    def pid(self) -> int:
        """Host pid of the broker process."""
        wrapped = self._container.get_wrapped_container()
        wrapped.reload()
        return int(wrapped.attrs["State"]["Pid"])

    def kill(self) -> None:
        """SIGKILL the broker."""
        self._container.get_wrapped_container().kill()

    def restart(self) -> ContainerBroker:
        """Start again on the same port."""
        self._container.get_wrapped_container().restart(timeout=2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(self._hostport(), 0.5):
                return self
            time.sleep(0.05)
        raise MeshError(f"mosquitto container on {self.address} did not come back")

    def _hostport(self) -> tuple[str, int]:
        return self.address.host, self.address.port

    def stop(self) -> None:
        """Remove the container."""
        self._container.stop()


@pytest.fixture
def topic_root(request: pytest.FixtureRequest) -> str:
    """A topic prefix no other test uses, so tests cannot see each other's messages."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return f"test/{name}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def running_brokers(n: int, tmp_path: Path) -> Iterator[list[Broker]]:
    """Start `n` brokers; stop every one that started when the block ends, however it ends."""
    started: list[MosquittoBroker | ContainerBroker] = []
    try:
        for i in range(n):
            broker: MosquittoBroker | ContainerBroker
            if docker_available():
                broker = ContainerBroker(tmp_path / f"broker-{i}")
            else:
                broker = MosquittoBroker(run_dir=tmp_path / f"broker-{i}", die_with_parent=True)
            started.append(broker)
            broker.start()
        yield list(started)
    finally:
        for broker in started:
            broker.stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """One broker for this test."""
    with running_brokers(1, tmp_path) as started:
        yield started[0]


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[list[Broker]]:
    """Two independent brokers (a mesh) for this test."""
    with running_brokers(2, tmp_path) as started:
        yield started
