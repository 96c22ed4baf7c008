"""Server-side bounds on what one client's reply can do, beyond refusing malformed ones.

`DeltaNormBound` (server.delta_norm_bound = k, off by default): a delta whose L2 norm is above
k times the median norm of the recently accepted deltas of the same size K is scaled down to
that norm. A client that sends -100 x its honest update then moves the hypernetwork no further
than an honest client with a k times larger update would; what it still controls is the
direction (README, "Threat model"). The first `warmup` deltas of a size pass unbounded.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

import numpy as np


class DeltaNormBound:
    def __init__(self, factor: float, window: int = 50, warmup: int = 3) -> None:
        self.factor = factor
        self.window = window
        self.warmup = warmup
        self.norms: dict[int, deque[float]] = {}

    def __call__(self, delta: np.ndarray) -> tuple[np.ndarray, bool]:
        """(the delta, scaled down if its norm is out of bounds; whether it was scaled)."""
        if self.factor <= 0:
            return delta, False
        norm = float(np.linalg.norm(delta.astype(np.float64)))
        recent = self.norms.setdefault(delta.size, deque(maxlen=self.window))
        scaled = False
        if len(recent) >= self.warmup:
            limit = self.factor * statistics.median(recent)
            if norm > limit > 0:
                delta = (delta * (limit / norm)).astype(np.float32)
                norm, scaled = limit, True
        recent.append(norm)  # what was accepted, so that outliers cannot raise the median
        return delta, scaled

    def state_dict(self) -> dict[str, Any]:
        return {str(k): list(v) for k, v in self.norms.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norms = {int(k): deque(v, maxlen=self.window) for k, v in state.items()}
