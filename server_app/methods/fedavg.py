"""The FedAvg baseline (McMahan et al.): one global parameter vector,
w <- w - sum_i (m_i / M) delta_i. All clients must share one architecture; they report their
identical seeded initial vector when they first register, and the first one becomes w_0."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Self

import numpy as np
import torch

from common import protocol
from common.config import ExperimentConfig
from server_app.round_loop import RoundLoop
from server_app.server_state import ClientRecord, ClientRegistry, RegistrationError


class FedAvgServer(ClientRegistry):
    def __init__(self, seed: int, max_params: int) -> None:
        super().__init__(seed, max_params)
        self.weights: np.ndarray | None = None

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Self:
        return cls(cfg.seed, cfg.server.max_params)

    def register(self, key: str, num_params: object) -> ClientRecord:
        k = self.check(key, num_params)
        sizes = {r.num_params for r in self.clients.values()}
        if sizes and k not in sizes:
            raise RegistrationError(
                f"FedAvg averages one architecture: K={k} differs from the others' K={sizes.pop()}"
            )
        return super().register(key, k)

    def admit(self, key: str, num_params: object, initial: np.ndarray | None) -> ClientRecord:
        """Register; the first client's (identical, seeded) initial vector becomes w_0."""
        if self.weights is None and (initial is None or initial.shape != (num_params,)):
            raise RegistrationError("FedAvg needs the client's initial parameters (K of them)")
        record = self.register(key, num_params)
        if self.weights is None:
            self.weights = np.array(initial, dtype=np.float32)
        return record

    def generate(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        return dict.fromkeys(keys, self.weights)

    def apply_deltas(
        self, deltas: Mapping[str, np.ndarray], server_round: int, weights=None, sent=None
    ) -> dict[str, Any]:
        """w <- w - sum_i (m_i / M) delta_i."""
        if not deltas:
            return {"updates": 0}
        self.weights = (self.weights - self.mean_delta(deltas, weights)).astype(np.float32)
        return {"updates": 1}

    @staticmethod
    def mean_delta(deltas: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
        """sum_i (m_i / M) delta_i in float64, summed in key order (not arrival order)."""
        total = sum(weights[k] for k in deltas)
        return sum((weights[k] / total) * deltas[k].astype(np.float64) for k in sorted(deltas))

    def describe(self) -> str:
        size = 0 if self.weights is None else self.weights.size
        return f"{len(self.clients)} clients, one global model of {size} parameters"

    def state_dict(self) -> dict[str, Any]:
        weights = None if self.weights is None else torch.from_numpy(self.weights)
        return {**self.registry_state(), "weights": weights}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str = "cpu", **_: Any) -> Self:
        server = cls(state["seed"], state.get("max_params", 50_000_000))
        server.restore_registry(state)
        weights = state["weights"]
        server.weights = None if weights is None else np.asarray(weights, np.float32)
        return server


class FedAvg(RoundLoop):
    state: FedAvgServer

    def register(self, identity: protocol.Identity) -> ClientRecord:
        return self.state.admit(identity.client_key, identity.num_params, identity.initial)
