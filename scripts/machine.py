"""What the benchmarks print about the machine they ran on."""

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name and core count, e.g. "Intel(R) Xeon(R) Processor, 2 cores"."""
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"
