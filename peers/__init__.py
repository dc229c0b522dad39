"""LayerSwarm peers: the wire format, membership, routing, the peer server, the OpenAI-compatible
entry, the Python SDK and the `peer` command."""

from .sdk import AsyncSwarmClient, Completion, SwarmAPIError, SwarmClient, SwarmConnectionError, Usage

__all__ = ["AsyncSwarmClient", "Completion", "SwarmAPIError", "SwarmClient", "SwarmConnectionError", "Usage"]
