"""Broker addresses and a local Mosquitto process for the mesh (tests, demo, single host).

A mesh is two or more independent brokers without bridges: every client connects to all of
them (see `transport.MeshClient`). `MosquittoBroker` runs one of them as a child process.
"""

from __future__ import annotations

import contextlib
import ctypes
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from string import Template
from types import TracebackType
from typing import Self

from jarvis_mqtt.errors import ConfigError, MeshError

DEFAULT_PORT = 1883
DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "broker" / "mosquitto.conf.tmpl"
DEFAULT_MAX_PACKET = 64 * 1024 * 1024 + 64 * 1024  # bytes: a 64 MiB payload plus its headers
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass(frozen=True, order=True)
class BrokerAddress:
    """Where one broker of the mesh listens."""

    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> BrokerAddress:
        """Parse `HOST`, `HOST:PORT` or `[V6]:PORT`; ConfigError when malformed."""
        text = text.strip()
        host, port_text = text, ""
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ConfigError(f"bad broker address {text!r}: expected [V6]:PORT")
            port_text = rest[1:]
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        if not host or any(c.isspace() for c in host):
            raise ConfigError(f"bad broker address {text!r}: empty host")
        if not port_text:
            return cls(host, DEFAULT_PORT)
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"bad broker address {text!r}: port must be 1..65535")
        return cls(host, int(port_text))


def parse_brokers(text: str) -> list[BrokerAddress]:
    """Parse `HOST:PORT[,HOST:PORT...]`, dropping duplicates; ConfigError when empty."""
    out: list[BrokerAddress] = []
    for part in text.split(","):
        if part.strip():
            addr = BrokerAddress.parse(part)
            if addr not in out:
                out.append(addr)
    if not out:
        raise ConfigError(f"no broker address in {text!r}")
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host` (another process may still take it before use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str:
    """Path of the mosquitto binary (Debian installs it in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise MeshError("mosquitto not found: install it (apt-get install mosquitto)")
    return found


@dataclass(frozen=True, kw_only=True)
class BrokerSecurity:
    """Who may connect to a broker and how: passwords, ACL, TLS. The default is an open broker."""

    password_file: Path | None = None  # Mosquitto password file; set: anonymous clients refused
    acl_file: Path | None = None  # Mosquitto ACL file (needs password_file: ACLs name users)
    tls_cert: Path | None = None  # broker certificate (PEM); set: the listener speaks only TLS
    tls_key: Path | None = None  # its private key
    tls_ca: Path | None = None  # CA that signs client certificates (and the broker's)
    require_client_cert: bool = False  # refuse TLS clients without a certificate from tls_ca

    def __post_init__(self) -> None:
        if self.acl_file is not None and self.password_file is None:
            raise ConfigError("an ACL file needs a password file: its rules name users")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both the broker certificate and its key")
        if self.require_client_cert and (self.tls_ca is None or self.tls_cert is None):
            raise ConfigError("client certificates need TLS and the CA that signs them")

    @property
    def tls(self) -> bool:
        """Whether the listener speaks TLS."""
        return self.tls_cert is not None

    def listener_lines(self) -> str:
        """Settings following the `listener` line."""
        if not self.tls:
            return ""
        lines = [f"certfile {self.tls_cert}", f"keyfile {self.tls_key}", "tls_version tlsv1.2"]
        if self.tls_ca is not None:
            lines.append(f"cafile {self.tls_ca}")
        lines.append(f"require_certificate {str(self.require_client_cert).lower()}")
        return "\n".join(lines)

    def auth_lines(self) -> str:
        """Anonymous access, or the password file and ACL."""
        if self.password_file is None:
            return "allow_anonymous true"
        lines = ["allow_anonymous false", f"password_file {self.password_file}"]
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        return "\n".join(lines)


def render_config(
    *,
    port: int,
    bind: str = "0.0.0.0",
    log_file: str | None,  # None: log to stdout (containers)
    user: str | None = None,  # None: the current user
    max_packet_size: int = DEFAULT_MAX_PACKET,  # bytes
    template: Path = DEFAULT_TEMPLATE,
    security: BrokerSecurity | None = None,  # None: anonymous, plain TCP
) -> str:
    """The text of a mesh broker's mosquitto.conf."""
    security = security or BrokerSecurity()
    try:
        tmpl = Template(template.read_text())
    except OSError as e:
        raise MeshError(f"cannot read broker config template {template}: {e}") from e
    paths = (
        security.password_file,
        security.acl_file,
        security.tls_cert,
        security.tls_key,
        security.tls_ca,
    )
    for path in paths:
        # Mosquitto reads a config line up to its end: a newline would smuggle in a setting.
        if path is not None and any(c in str(path) for c in "\r\n"):
            raise ConfigError(f"bad path in broker config: {str(path)!r}")
    return tmpl.substitute(
        port=port,
        bind=bind,
        user=user or getpass.getuser(),
        log_dest=f"file {log_file}" if log_file else "stdout",
        max_packet_size=max_packet_size,
        listener_tls=security.listener_lines(),
        auth=security.auth_lines(),
    )


def _die_with_parent_hook() -> Callable[[], None]:
    """A pre-exec hook asking Linux to SIGKILL the child when the starting thread exits."""
    # Resolved here, in the parent: loading a library between fork and exec can deadlock.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return hook


class MosquittoBroker:
    """One Mosquitto child process on a fixed port; `with MosquittoBroker() as b: b.address`."""

    def __init__(
        self,
        *,
        port: int | None = None,  # None: a free port chosen at the first start
        bind: str = "127.0.0.1",
        run_dir: Path | None = None,  # config and log go here; None: a temp dir removed at stop
        binary: str | None = None,
        template: Path = DEFAULT_TEMPLATE,
        max_packet_size: int = DEFAULT_MAX_PACKET,  # bytes
        start_timeout: float = 10.0,  # seconds until the port must accept connections
        stop_timeout: float = 5.0,  # seconds between SIGTERM and SIGKILL
        die_with_parent: bool = False,  # Linux: SIGKILL the broker when the starting thread exits
        security: BrokerSecurity | None = None,  # None: anonymous, plain TCP (a local mesh)
    ) -> None:
        self._port = port
        self._auto_port = port is None
        self._bind = bind
        self._run_dir = run_dir
        self._owns_dir = run_dir is None
        self._binary = binary
        self._template = template
        self._max_packet_size = max_packet_size
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._die_with_parent = die_with_parent and sys.platform == "linux"
        self._proc: subprocess.Popen[bytes] | None = None
        self.security = security or BrokerSecurity()

    @property
    def address(self) -> BrokerAddress:
        """Address clients connect to (loopback when bound to every interface)."""
        if self._port is None:
            raise MeshError("broker not started yet: no port")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self._bind, self._bind)
        return BrokerAddress(host, self._port)

    @property
    def pid(self) -> int:
        """Process id of the running broker."""
        if self._proc is None:
            raise MeshError("broker not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        """The broker's log file."""
        return self._dir() / "mosquitto.log"

    def log_tail(self, lines: int = 20) -> str:
        """Last lines of the broker log and its stderr, for error messages."""
        text = ""
        for path in (self.log_path, self._dir() / "mosquitto.stderr"):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> Self:
        """Write the config, start mosquitto and wait until its port accepts connections."""
        if self.running:
            return self
        if self._port is None:
            self._port = free_port(self._bind or "0.0.0.0")
        attempt = 1
        while True:
            try:
                self._spawn()
                return self
            except MeshError:
                # Another process can take an auto-chosen port between probe and bind.
                if not self._auto_port or attempt == 3:
                    raise
                attempt += 1
                self._port = free_port(self._bind or "0.0.0.0")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after `stop_timeout`; reaps the process and removes a temp dir."""
        self._terminate()
        if self._owns_dir and self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its password file and ACL without dropping clients."""
        if self._proc is None or self._proc.poll() is not None:
            raise MeshError("broker not running")
        os.kill(self._proc.pid, signal.SIGHUP)

    def kill(self) -> None:
        """SIGKILL the broker (a crash, as tests need it) and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        if proc is not None:
            proc.wait()

    def restart(self) -> Self:
        """Stop if running, then start again on the same port."""
        self._terminate()
        self._auto_port = False  # clients know this port now
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _dir(self) -> Path:
        if self._run_dir is None:
            self._run_dir = Path(tempfile.mkdtemp(prefix="jarvis-mosquitto-"))
        self._run_dir.mkdir(parents=True, exist_ok=True)
        return self._run_dir

    def _render(self) -> Path:
        assert self._port is not None
        conf = self._dir() / "mosquitto.conf"
        conf.write_text(
            render_config(
                port=self._port,
                bind=self._bind or "0.0.0.0",
                log_file=str(self.log_path),
                max_packet_size=self._max_packet_size,
                template=self._template,
                security=self.security,
            )
        )
        return conf

    def _spawn(self) -> None:
        conf = self._render()
        binary = self._binary or find_mosquitto()
        # The log is appended to across restarts: only what this run writes counts.
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with (self._dir() / "mosquitto.stderr").open("wb") as err:
            self._proc = subprocess.Popen(
                [binary, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                # Terminal signals go to the owner, which stops the broker by pid.
                start_new_session=True,
                preexec_fn=_die_with_parent_hook() if self._die_with_parent else None,
            )
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise MeshError(
                    f"mosquitto on {self.address} exited with {code} at start:\n{self.log_tail()}"
                )
            # Another process listening on the port would pass a bare connect test.
            if self._logged_running(offset) and self._accepts():
                return
            if time.monotonic() > deadline:
                self._terminate()
                raise MeshError(
                    f"mosquitto on {self.address} did not accept connections within "
                    f"{self._start_timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.01)

    def _logged_running(self, offset: int) -> bool:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return b" running" in f.read()
        except OSError:
            return False

    def _accepts(self) -> bool:
        addr = self.address
        try:
            with socket.create_connection((addr.host, addr.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self._stop_timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
