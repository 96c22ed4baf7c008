"""A seventh method in one module: FedAvgM, FedAvg with server momentum (Hsu et al., 2019).

The server keeps a velocity v <- beta v + sum_i (m_i / M) delta_i and moves the global vector
by it, w <- w - v. Everything else (admission, messages, evaluation, checkpoints, hardening)
is FedAvg's, so the module holds only what differs, and the method's whole declaration is the
`METHOD` entry below: in this repository it would go into `METHODS` in common/methods.py
(README, "Adding a method"); tests/test_new_method.py registers it from here and runs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

import numpy as np
import torch

from common import protocol
from common.methods import Method
from server_app.methods.fedavg import FedAvg, FedAvgServer

BETA = 0.9


class FedAvgMServer(FedAvgServer):
    def __init__(self, seed: int, max_params: int) -> None:
        super().__init__(seed, max_params)
        self.velocity: np.ndarray | None = None

    def apply_deltas(
        self, deltas: Mapping[str, np.ndarray], server_round: int, weights=None, sent=None
    ) -> dict[str, Any]:
        if not deltas:
            return {"updates": 0}
        step = self.mean_delta(deltas, weights)
        self.velocity = step if self.velocity is None else BETA * self.velocity + step
        self.weights = (self.weights - self.velocity).astype(np.float32)
        return {"updates": 1}

    def state_dict(self) -> dict[str, Any]:
        velocity = None if self.velocity is None else torch.from_numpy(self.velocity)
        return {**super().state_dict(), "velocity": velocity}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str = "cpu", **_: Any) -> Self:
        server = super().from_state_dict(state, device)
        velocity = state.get("velocity")
        server.velocity = None if velocity is None else np.asarray(velocity, np.float64)
        return server


class FedAvgM(FedAvg):
    """FedAvg's rounds; only the server state differs."""


METHOD = Method(
    "fedavgm",
    "baseline: FedAvg with server momentum 0.9 (one architecture)",
    strategy="fedavgm:FedAvgM",
    state="fedavgm:FedAvgMServer",
    reports=(protocol.INITIAL,),
)
