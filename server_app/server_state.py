"""What every method's server state offers the round loop, and the client registry they share.

A server state is plain Python/PyTorch (no Flower): the Strategy registers clients in it and
asks it for the vectors clients receive; how replies change it is the Strategy's
`apply_train`. `ServerState` is that interface; `ClientRegistry` is the key -> K bookkeeping
every state starts from.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np

from common.config import DEFAULT_MAX_PARAMS, ExperimentConfig


class RegistrationError(ValueError):
    """A client's reported size or key cannot be accepted; server state is unchanged."""


class UpdateRejected(ValueError):
    """A client's update that cannot be applied (it would not be finite); nothing changed."""


@dataclass(frozen=True)
class ClientRecord:
    key: str
    num_params: int  # K: the length of the vector it trains


@runtime_checkable
class ServerState(Protocol):
    """The interface the round loop uses; each method's state implements it."""

    seed: int
    clients: Mapping[str, ClientRecord]

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Self:
        """A fresh state for this experiment."""

    def register(self, key: str, num_params: object) -> ClientRecord:
        """Accept a client's K (idempotent for the same K) or raise RegistrationError."""

    def record(self, key: str) -> ClientRecord: ...

    def generate(self, keys: Sequence[str]) -> Mapping[str, np.ndarray | None]:
        """The vector each client receives (None: the client uses its own model)."""

    def state_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str = "cpu") -> Self: ...

    def describe(self) -> str: ...


def bounded_weights(counts: Mapping[str, int], ratio: float) -> dict[str, float]:
    """Example counts as weights, each at most `ratio` x the round's lower median: a client
    cannot take a weighted step over by claiming 10^12 examples (it counts as `ratio`
    typical clients at most). `ratio` 0 leaves the counts as they are. The median is over
    the clients that have examples: clients reporting none (an empty test split) would
    otherwise pull the cap to 0 and every weight with it."""
    positive = [v for v in counts.values() if v > 0]
    if not positive or ratio <= 0:
        return {k: float(v) for k, v in counts.items()}
    cap = ratio * statistics.median_low(positive)
    return {k: float(min(v, cap)) for k, v in counts.items()}


def validate_num_params(value: object, max_params: int) -> int:
    """K must be a positive integer not above the configured capacity."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise RegistrationError(f"parameter count K must be a positive integer, got {value!r}")
    value = int(value)
    if value <= 0:
        raise RegistrationError(f"parameter count K must be a positive integer, got {value}")
    if value > max_params:
        raise RegistrationError(
            f"parameter count K={value} exceeds the server's maximum of {max_params} "
            "(raise server.max_params to accept larger models)"
        )
    return value


class ClientRegistry:
    """Client key -> K; a key never changes its K (a new model needs a new key)."""

    def __init__(self, seed: int, max_params: int) -> None:
        self.seed = seed
        self.max_params = max_params
        self.clients: dict[str, ClientRecord] = {}

    def register(self, key: str, num_params: object) -> ClientRecord:
        k = self.check(key, num_params)
        if key not in self.clients:
            self.clients[key] = ClientRecord(key, k)
        return self.clients[key]

    def check(self, key: str, num_params: object) -> int:
        """The validated K for this key, refusing a K that differs from the registered one."""
        k = validate_num_params(num_params, self.max_params)
        known = self.clients.get(key)
        if known is not None and known.num_params != k:
            raise RegistrationError(
                f"client {key!r} reported K={k} but is registered with K={known.num_params}; "
                "a client key cannot change its model size (use a new key for a new model)"
            )
        return k

    def record(self, key: str) -> ClientRecord:
        try:
            return self.clients[key]
        except KeyError:
            raise KeyError(f"client {key!r} is not registered") from None

    def registry_state(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "max_params": self.max_params,
            "clients": [(r.key, r.num_params) for r in self.clients.values()],
        }

    def restore_registry(self, state: dict[str, Any]) -> None:
        for key, num_params in state["clients"]:
            self.register(key, num_params)

    @classmethod
    def from_registry_state(cls, state: dict[str, Any]) -> Self:
        """A registry with the clients of a `registry_state()`, in their order."""
        registry = cls(state["seed"], state.get("max_params", DEFAULT_MAX_PARAMS))
        registry.restore_registry(state)
        return registry
