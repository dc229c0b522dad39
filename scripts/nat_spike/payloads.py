"""What every engine's bench sends: a 3 KB decode frame 50 times and a 2 MB prefill frame 10
times, random bytes, or (HIDDEN_STATES=1) runs of one float32 to find in a packet capture."""

import os
import struct

HIDDEN = struct.pack("<f", 1.5) * 4
COUNTS = {3072: 50, 2 * 1024 * 1024: 10}


def payload_of(size: int) -> bytes:
    if os.environ.get("HIDDEN_STATES") == "1":
        return (HIDDEN * (size // len(HIDDEN) + 1))[:size]
    return os.urandom(size)
