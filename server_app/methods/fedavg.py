"""The FedAvg baseline (McMahan et al., AISTATS 2017): one global parameter vector,
w <- w - sum_i (m_i / M) delta_i, with m_i each client's example count (bounded by
server.max_example_weight). All clients share one architecture. The server starts from the
`initial_arrays` it is given, else from the seeded initial vector clients report when they
first register (they all report the same one)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Self

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common import protocol
from common.config import ExperimentConfig
from server_app.round_loop import RoundLoop
from server_app.server_state import ClientRecord, ClientRegistry, RegistrationError

GLOBAL_VECTOR = "w"  # the global model in the Strategy's ArrayRecords


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
        if self.weights is not None:
            sizes.add(self.weights.size)
        if sizes and k not in sizes:
            raise RegistrationError(
                f"FedAvg averages one architecture: K={k} differs from the others' K={sizes.pop()}"
            )
        return super().register(key, k)

    def register_with_initial(
        self, key: str, num_params: object, initial: np.ndarray | None
    ) -> ClientRecord:
        """Register; without a global vector yet, the client's (identical, seeded) initial
        vector becomes w_0."""
        if self.weights is None and (initial is None or initial.shape != (num_params,)):
            raise RegistrationError("FedAvg needs the client's initial parameters (K of them)")
        record = self.register(key, num_params)
        if self.weights is None:
            self.weights = np.array(initial, dtype=np.float32)
        return record

    def generate(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        return dict.fromkeys(keys, self.weights)

    def step(self, mean_delta: np.ndarray) -> None:
        """w <- w - mean delta."""
        self.weights = (self.weights - mean_delta).astype(np.float32)

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
        server = cls.from_registry_state(state)
        weights = state["weights"]
        server.weights = None if weights is None else np.asarray(weights, np.float32)
        return server


class FedAvg(RoundLoop):
    state: FedAvgServer
    state_class = FedAvgServer

    def register(self, identity: protocol.Identity) -> ClientRecord:
        """An initial vector is checked like a delta (finite, every entry within
        server.max_delta_abs): the first one becomes everyone's w_0."""
        initial = identity.extras.get(protocol.INITIAL)
        limit = self.cfg.server.max_delta_abs
        if initial is not None and initial.size and float(np.abs(initial).max()) > limit:
            raise RegistrationError(f"initial vector with an entry above {limit:g} in "
                                    "absolute value (server.max_delta_abs)")  # fmt: skip
        return self.state.register_with_initial(identity.client_key, identity.num_params, initial)

    def federation_value(self, identity: protocol.Identity) -> Any:
        return identity.num_params  # one architecture: its K

    def apply_train(
        self, server_round: int, results: Mapping[str, protocol.TrainResult]
    ) -> dict[str, str]:
        if results:
            deltas = {k: r.delta for k, r in results.items()}
            self.state.step(self.state.mean_delta(deltas, self.weights(results)))
        return {}

    def global_arrays(self) -> ArrayRecord:
        if self.state.weights is None:
            return ArrayRecord()
        return ArrayRecord({GLOBAL_VECTOR: Array(self.state.weights)})

    def set_initial_arrays(self, arrays: ArrayRecord) -> None:
        """w_0 from the server (one vector, `w`), instead of from the first client."""
        if set(arrays) != {GLOBAL_VECTOR}:
            raise ValueError(f"FedAvg starts from one vector named {GLOBAL_VECTOR!r}")
        vector = np.asarray(arrays[GLOBAL_VECTOR].numpy(), np.float32).ravel()
        if not np.isfinite(vector).all():
            raise ValueError("the initial vector holds NaN or Inf")
        self.state.weights = vector
