"""Who a mesh connection is: MQTT credentials and TLS with the mesh's own CA.

Explicit settings win; each missing one is read from the environment (`JARVIS_MQTT_*`), which
a deployed node or client gets from a mode-0600 file rather than from its command line.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from jarvis_mqtt.errors import ConfigError

# What a process reads when its caller passes no credentials (a command line shows in `ps`).
ENV_USERNAME = "JARVIS_MQTT_USERNAME"
ENV_PASSWORD = "JARVIS_MQTT_PASSWORD"
ENV_TLS_CA = "JARVIS_MQTT_TLS_CA"
ENV_TLS_CERT = "JARVIS_MQTT_TLS_CERT"
ENV_TLS_KEY = "JARVIS_MQTT_TLS_KEY"


@dataclass(frozen=True, kw_only=True)
class MeshAuth:
    """Credentials and TLS settings used for every broker connection of a MeshClient."""

    username: str | None = None  # None: anonymous (a local mesh)
    password: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None  # CA certificate (PEM) brokers are checked against; None: no TLS
    tls_cert: Path | None = None  # client certificate (PEM) when brokers require one
    tls_key: Path | None = None  # its private key; None: the key is in `tls_cert`
    tls_insecure: bool = False  # skip the host name check (the chain is still verified)

    @classmethod
    def resolve(
        cls,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_insecure: bool = False,
        env: Mapping[str, str] | None = None,  # None: os.environ
    ) -> MeshAuth:
        """Explicit settings, each missing one taken from `JARVIS_MQTT_*`; ConfigError if bad."""
        env = os.environ if env is None else env

        def path(value: str | Path | None, name: str) -> Path | None:
            value = value if value is not None else env.get(name) or None
            return Path(value).expanduser() if value is not None else None

        auth = cls(
            username=username if username is not None else env.get(ENV_USERNAME) or None,
            password=password if password is not None else env.get(ENV_PASSWORD) or None,
            tls_ca=path(tls_ca, ENV_TLS_CA),
            tls_cert=path(tls_cert, ENV_TLS_CERT),
            tls_key=path(tls_key, ENV_TLS_KEY),
            tls_insecure=tls_insecure,
        )
        if auth.password is not None and auth.username is None:
            raise ConfigError(f"an MQTT password needs a username (set {ENV_USERNAME})")
        if (auth.tls_cert or auth.tls_key) and auth.tls_ca is None:
            raise ConfigError("a TLS client certificate needs the mesh CA (tls_ca) too")
        if auth.tls_key is not None and auth.tls_cert is None:
            raise ConfigError("a TLS client key needs its certificate (tls_cert)")
        return auth

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client TLS context trusting only the mesh CA; None without TLS."""
        if self.tls_ca is None:
            return None
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.tls_ca))
            if self.tls_cert is not None:
                ctx.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load TLS files ({self.tls_ca}, {self.tls_cert}): {e}") from e
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # Only the name check can be waived: verify_mode stays CERT_REQUIRED.
        ctx.check_hostname = not self.tls_insecure
        return ctx
