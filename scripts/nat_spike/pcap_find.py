"""Counts float32 runs of the benches' HIDDEN_STATES payload in a capture file (plain bytes search)."""

import struct
import sys

needle = struct.pack("<f", 1.5) * 4
with open(sys.argv[1], "rb") as f:
    data = f.read()
print(f"{sys.argv[1]}: {len(data)} bytes captured, plaintext hidden-state runs found: {data.count(needle)}")
