"""The paper's baselines in the same app, so every method sees the same data, seeds and models.

- Local: clients train their own models and never send parameters; the server only asks them
  to train and to evaluate.
- FedAvg: one global parameter vector, w <- w - sum_i (m_i / M) delta_i; all clients must share
  one architecture (they send their identical seeded initial vector when they first report).
- pFedHN (Shamsian et al. 2021): one embedding per client, the same feature extractor, and one
  linear head per parameter tensor; homogeneous models (clients report their tensor sizes).

Each baseline is a server-state object with the interface the Strategy uses (register,
record, generate, apply_deltas, state_dict) plus a small Strategy subclass where the
messages differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from torch import nn

from common import protocol
from common.seeding import stable_seed
from server_app.state import (
    ClientRecord,
    HypernetworkServer,
    HypernetworkSettings,
    RegistrationError,
    settings_from_dict,
    validate_num_params,
)
from server_app.strategy import MHpFedHN


class _Registry:
    """Client key -> K, refusing a key that changes its K (as the hypernetwork server does)."""

    def __init__(self, settings: HypernetworkSettings, seed: int) -> None:
        self.settings = settings
        self.seed = seed
        self.clients: dict[str, ClientRecord] = {}

    def register(self, key: str, num_params: object) -> ClientRecord:
        k = validate_num_params(num_params, self.settings.max_params)
        known = self.clients.get(key)
        if known is not None and known.num_params != k:
            raise RegistrationError(f"client {key!r} is registered with K={known.num_params}")
        if known is None:
            self.clients[key] = ClientRecord(key, k, 1, "")
        return self.clients[key]

    def record(self, key: str) -> ClientRecord:
        return self.clients[key]

    def registry_state(self) -> dict:
        return {
            "settings": dataclasses.asdict(self.settings),
            "seed": self.seed,
            "clients": [(r.key, r.num_params) for r in self.clients.values()],
        }


class LocalServer(_Registry):
    """Nothing to learn on the server: Local sends no vectors and applies no updates."""

    def generate(self, keys: Sequence[str]) -> dict[str, None]:
        return dict.fromkeys(keys)

    def apply_deltas(self, deltas, server_round, weights=None, sent=None) -> dict:
        return {"updates": 0}

    def describe(self) -> str:
        return f"{len(self.clients)} clients training locally"

    def state_dict(self) -> dict:
        return self.registry_state()

    @classmethod
    def from_state_dict(cls, state: dict, device="cpu") -> LocalServer:
        server = cls(settings_from_dict(state["settings"]), state["seed"])
        for key, k in state["clients"]:
            server.register(key, k)
        return server


class FedAvgServer(_Registry):
    def __init__(self, settings: HypernetworkSettings, seed: int) -> None:
        super().__init__(settings, seed)
        self.weights: np.ndarray | None = None

    def register(self, key: str, num_params: object) -> ClientRecord:
        k = validate_num_params(num_params, self.settings.max_params)
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
    ):
        """w <- w - sum_i (m_i / M) delta_i (McMahan et al.), in key order."""
        if not deltas:
            return {"updates": 0}
        total = sum(weights[k] for k in deltas)
        step = sum((weights[k] / total) * deltas[k].astype(np.float64) for k in sorted(deltas))
        self.weights = (self.weights - step).astype(np.float32)
        return {"updates": 1}

    def describe(self) -> str:
        size = 0 if self.weights is None else self.weights.size
        return f"{len(self.clients)} clients, one global model of {size} parameters"

    def state_dict(self) -> dict:
        return {**self.registry_state(), "weights": self.weights}

    @classmethod
    def from_state_dict(cls, state: dict, device="cpu") -> FedAvgServer:
        server = cls(settings_from_dict(state["settings"]), state["seed"])
        for key, k in state["clients"]:
            server.register(key, k)
        server.weights = state["weights"]
        return server


class PerTensorHeads(nn.Module):
    """pFedHN's heads: one Linear(hidden, numel) per parameter tensor of the target model."""

    def __init__(self, hidden_dim: int, sizes: Sequence[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(hidden_dim, n) for n in sizes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(features) for head in self.heads], dim=-1)


class PFedHNServer(HypernetworkServer):
    """The original pFedHN generator on the same server machinery (VJP, clip, Adam)."""

    HEAD = "pertensor"

    def __init__(self, settings=None, *, seed: int = 0, device="cpu") -> None:
        super().__init__(settings, seed=seed, device=device)
        self.tensor_sizes: list[int] | None = None

    def set_tensor_sizes(self, sizes: Sequence[int] | None) -> None:
        if not sizes or not all(isinstance(n, int) and n > 0 for n in sizes):
            raise RegistrationError("pFedHN needs the client's parameter tensor sizes")
        sizes = [int(n) for n in sizes]
        if self.tensor_sizes is None:
            self.tensor_sizes = sizes
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                heads = PerTensorHeads(self.settings.hidden_dim, sizes).to(self.device)
            self.hnet.heads[self.HEAD] = heads
            self.optimizer.add_param_group({"params": list(heads.parameters())})
        elif sizes != self.tensor_sizes:
            raise RegistrationError("pFedHN has one head per tensor: all clients must share them")

    def _register(self, key: str, num_params: object) -> ClientRecord:
        k = validate_num_params(num_params, self.settings.max_params)
        if self.tensor_sizes is None or k != sum(self.tensor_sizes):
            raise RegistrationError(f"K={k} does not match the tensor sizes reported")
        if key in self.clients:
            return self.clients[key]
        generator = torch.Generator().manual_seed(stable_seed(self.seed, "embedding", key))
        init = torch.randn(1, self.settings.embedding_dim, generator=generator)
        name = f"client{len(self.clients)}"
        self.embeddings[name] = nn.Parameter((init * self.settings.embedding_std).to(self.device))
        self.optimizer.add_param_group({"params": [self.embeddings[name]]})
        self.clients[key] = ClientRecord(key, k, 1, name)
        return self.clients[key]

    def _generate_group(self, keys: Sequence[str]) -> list[torch.Tensor]:
        stacked = torch.stack([self.embedding(k) for k in keys])  # (n, 1, e)
        flat = self.hnet.heads[self.HEAD](self.hnet.feature_extractor(stacked))[:, 0]
        return [flat[i] for i in range(len(keys))]

    def _involved_parameters(self, keys: Sequence[str]) -> list[nn.Parameter]:
        params = list(self.hnet.feature_extractor.parameters())
        params += list(self.hnet.heads[self.HEAD].parameters())
        return params + [self.embedding(k) for k in keys]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "tensor_sizes": self.tensor_sizes}

    def _restore_structure(self, state: dict) -> None:
        self.set_tensor_sizes(state["tensor_sizes"])


# ------------------------------------------------------------------ strategies
class LocalStrategy(MHpFedHN):
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        results = self.parse_replies(replies, lambda key, r: protocol.parse_local_train_reply(r))
        examples = sum(r.num_examples for r in results.values())
        loss = sum(r.train_loss * r.num_examples for r in results.values()) / max(examples, 1)
        self._log.values.update(clients_trained=len(results), train_loss=loss)
        return None, MetricRecord({"clients-trained": len(results), "train-loss": loss})


class FedAvgStrategy(MHpFedHN):
    def admit(self, identity: protocol.Identity) -> ClientRecord:
        return self.server.admit(identity.client_key, identity.num_params, identity.initial)


class PFedHNStrategy(MHpFedHN):
    def admit(self, identity: protocol.Identity) -> ClientRecord:
        self.server.set_tensor_sizes(identity.tensor_sizes)
        return super().admit(identity)
