"""One request across the swarm: route, failover and replay, speculation, steering, consensus."""
