"""FedAvgM (Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", arXiv 1909.06335, 2019): FedAvg with server momentum,
v <- beta v + sum_i (m_i / M) delta_i, w <- w - v. Everything else is FedAvg's, so this
module holds only what differs and its setting; the method is this module and its registry
entry (docs/adding-a-method.md uses it as the worked example of a server-side method)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from common.config import ExperimentConfig
from server_app.methods.fedavg import FedAvg, FedAvgServer


class FedAvgMSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    momentum: float = Field(
        0.9, ge=0.0, lt=1.0, description="server momentum beta (0 is FedAvg; the paper: 0.9)"
    )


class FedAvgMServer(FedAvgServer):
    def __init__(self, seed: int, max_params: int, momentum: float = 0.9) -> None:
        super().__init__(seed, max_params)
        self.momentum = momentum
        self.velocity: np.ndarray | None = None

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Self:
        return cls(cfg.seed, cfg.server.max_params, cfg.method_settings.momentum)

    def step(self, mean_delta: np.ndarray) -> None:
        """v <- beta v + mean delta; w <- w - v."""
        velocity = self.velocity
        self.velocity = mean_delta if velocity is None else self.momentum * velocity + mean_delta
        super().step(self.velocity)

    def state_dict(self) -> dict[str, Any]:
        velocity = None if self.velocity is None else torch.from_numpy(self.velocity)
        return {**super().state_dict(), "velocity": velocity, "momentum": self.momentum}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: str = "cpu", **_: Any) -> Self:
        server = super().from_state_dict(dict(state), device)
        server.momentum = float(state["momentum"])
        velocity = state.get("velocity")
        server.velocity = None if velocity is None else np.asarray(velocity, np.float64)
        return server


class FedAvgM(FedAvg):
    state: FedAvgMServer
    state_class = FedAvgMServer
