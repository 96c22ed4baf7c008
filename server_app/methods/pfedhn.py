"""The pFedHN baseline (Shamsian et al., 2021): one embedding per client, the same feature
extractor as MH-pFedHN, and one linear head per parameter tensor of the (single) target
architecture, whose tensor sizes clients report. It runs on the same server machinery
(VJP, clipping, Adam, the round schedules), so only the generator differs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from common import protocol
from common.seeding import stable_seed
from server_app.hypernetwork_rounds import HypernetworkRounds
from server_app.hypernetwork_server import HypernetworkServer
from server_app.server_state import ClientRecord, RegistrationError


class PerTensorHeads(nn.Module):
    """pFedHN's heads: one Linear(hidden, numel) per parameter tensor of the target model."""

    def __init__(self, hidden_dim: int, sizes: Sequence[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(hidden_dim, n) for n in sizes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(features) for head in self.heads], dim=-1)


class PFedHNServer(HypernetworkServer):
    HEAD = "pertensor"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tensor_sizes: list[int] | None = None

    def set_tensor_sizes(self, sizes: Sequence[int] | None) -> None:
        if not sizes or not all(isinstance(n, int) and n > 0 for n in sizes):
            raise RegistrationError("pFedHN needs the client's parameter tensor sizes")
        sizes = [int(n) for n in sizes]
        if self.tensor_sizes is None:
            self.check_budget(sum(sizes) * (self.settings.hidden_dim + 1), "pFedHN's heads")
            self.tensor_sizes = sizes
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                heads = PerTensorHeads(self.settings.hidden_dim, sizes).to(self.device)
            self.hnet.heads[self.HEAD] = heads
            self.optimizer.add_param_group({"params": list(heads.parameters())})
        elif sizes != self.tensor_sizes:
            raise RegistrationError("pFedHN has one head per tensor: all clients must share them")

    def _register(self, key: str, num_params: object) -> ClientRecord:
        k = self.registry.check(key, num_params)
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


class PFedHN(HypernetworkRounds):
    state: PFedHNServer

    def register(self, identity: protocol.Identity) -> ClientRecord:
        self.state.set_tensor_sizes(identity.tensor_sizes)
        return super().register(identity)
