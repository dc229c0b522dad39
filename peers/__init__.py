"""LayerSwarm peers: the wire format, membership, routing, the peer server, the OpenAI-compatible
entry, the Python SDK and the `peer` command."""

from importlib.metadata import PackageNotFoundError, version

from peers.sdk import (
    AsyncSwarmClient,
    Completion,
    SwarmAPIError,
    SwarmClient,
    SwarmConnectionError,
    SwarmTimeoutError,
    Usage,
)

try:
    __version__ = version("layerswarm")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "unknown"

__all__ = [
    "AsyncSwarmClient",
    "Completion",
    "SwarmAPIError",
    "SwarmClient",
    "SwarmConnectionError",
    "SwarmTimeoutError",
    "Usage",
    "__version__",
]
