"""What the benchmarks print about the machine they ran on."""

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name, e.g. "Intel(R) Xeon(R) Processor"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_model() -> str:
    """The CPU's model name and core count, e.g. "Intel(R) Xeon(R) Processor, 2 cores"."""
    return f"{cpu_name()}, {os.cpu_count()} cores"


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
