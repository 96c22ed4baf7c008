"""Server-side bounds on what one client's reply can do, beyond refusing malformed ones.

`DeltaNormBound` (server.delta_norm_bound = k, off by default): a delta whose size is above k
times the median of the recently accepted deltas is scaled down to that. Size is measured per
coordinate (the L2 norm over sqrt(K)), so the bound holds across clients of every K: a client
that reports a K nobody else has is bounded by the others from its first delta on. Once a K
has enough history of its own, its own median bounds it too (the tighter of the two). A client
that sends -100 x its honest update then moves the hypernetwork no further than an honest
client with a k times larger update would; what it still controls is the direction
(docs/threat-model.md). The first `warmup` deltas of the run pass unbounded.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

import numpy as np


class DeltaNormBound:
    def __init__(self, factor: float, window: int = 50, warmup: int = 3) -> None:
        self.factor = factor
        self.window = window
        self.warmup = warmup
        self.recent: deque[float] = deque(maxlen=window)  # per-coordinate sizes, any K
        self.norms: dict[int, deque[float]] = {}  # the same, per K

    def limit(self, size: int) -> float | None:
        """The largest per-coordinate size a delta of `size` entries may have now."""
        if len(self.recent) < self.warmup:
            return None
        limit = self.factor * statistics.median(self.recent)
        own = self.norms.get(size, ())
        if len(own) >= self.warmup:
            limit = min(limit, self.factor * statistics.median(own))
        return limit

    def __call__(self, delta: np.ndarray) -> tuple[np.ndarray, bool]:
        """(the delta, scaled down if its size is out of bounds; whether it was scaled)."""
        if self.factor <= 0 or delta.size == 0:
            return delta, False
        rms = float(np.linalg.norm(delta.astype(np.float64))) / math.sqrt(delta.size)
        limit = self.limit(delta.size)
        scaled = False
        if limit is not None and rms > limit > 0:
            delta = (delta * (limit / rms)).astype(np.float32)
            rms, scaled = limit, True
        self.recent.append(rms)  # what was accepted, so that outliers cannot raise the median
        self.norms.setdefault(delta.size, deque(maxlen=self.window)).append(rms)
        return delta, scaled

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent),
                "per_size": {str(k): list(v) for k, v in self.norms.items()}}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "recent" not in state:  # none, or the per-K L2 norms of an older version: anew
            state = {}
        self.recent = deque(state.get("recent", []), maxlen=self.window)
        self.norms = {int(k): deque(v, maxlen=self.window)
                      for k, v in state.get("per_size", {}).items()}  # fmt: skip
