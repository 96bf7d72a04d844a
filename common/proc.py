"""This process's age, for start-up reports (the server's replicas, generate.py), and the machine's memory."""
from __future__ import annotations

import os
from typing import Optional


def process_age_s() -> Optional[float]:
    """Seconds since this process started (Linux /proc, 10 ms ticks), None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def physical_memory() -> int:
    """This machine's memory in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
