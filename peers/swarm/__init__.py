"""Who is out there and whom to trust: identity, membership, gossip, links, routing, placement, reputation, commitments."""
