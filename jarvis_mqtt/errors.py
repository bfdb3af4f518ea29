"""One root exception for the package and a shallow tree under it."""


class JarvisError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(JarvisError):
    """A model config or command-line setting that cannot be used (e.g. an unknown family)."""


class CheckpointError(JarvisError):
    """A model directory, shard or GGUF file that is missing, corrupt or unreadable."""


class WireError(JarvisError):
    """A message from the network that does not decode or validate."""


class SessionError(JarvisError):
    """A session that is unknown, expired, or does not fit in the KV memory left."""


class CacheMissError(SessionError):
    """This span holds fewer positions of a session than a message needs: replay from `have`."""

    def __init__(self, text: str, *, session: str, have: int) -> None:
        super().__init__(text)
        self.session, self.have = session, have


class MeshError(JarvisError):
    """The mesh cannot serve a request: layers missing, brokers unreachable, timeouts."""
