"""Bytes between peers: step frames, wire encodings, the forwarder, direct return, auth, HTTP limits."""
