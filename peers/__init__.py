"""LayerSwarm peers: the wire format, membership, routing, the peer server, the OpenAI-compatible
entry, the Python SDK and the `peer` command."""
