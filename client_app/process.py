"""How long this ClientApp process has been alive: in deployment every message starts a new
one, and its start-up and imports are part of a round's cost (reported as time-process)."""

from __future__ import annotations

import os
import time
from pathlib import Path

STARTED_ENV = "MH_PFEDHN_PROCESS_STARTED"  # set by a warm start: when its process started


def process_age() -> float | None:
    """Seconds since this process started (Linux). A process forked warm
    (deployment/warm_clientapp.py) counts from when the SuperExec started it."""
    if started := os.environ.get(STARTED_ENV):
        return max(time.time() - float(started), 0.0)
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))  # fmt: skip
        return max(time.time() - (boot + ticks / os.sysconf("SC_CLK_TCK")), 0.0)
    except (OSError, ValueError, IndexError, StopIteration):
        return None
