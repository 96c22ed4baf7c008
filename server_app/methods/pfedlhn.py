"""pFedLHN (Zhu, Liu and Sun, "Layer-Wise Personalized Federated Learning with Hypernetwork",
Neural Processing Letters 55, 2023; code tianyuzeke/pFedLHN, very probably the authors'):
a hypernetwork whose client embedding is layer-wise. Each client i has a coefficient matrix
C_i (one row per parameter tensor of its model, n_e columns) over a bank E of n_e shared
embeddings; the l-th tensor is theta_i^l = Head_l(fc1(C_i[l] E)), fc1 a linear map without a
nonlinearity (as the code), one head per tensor. For clients of several architectures there
is a set of heads per architecture on the one bank and fc1 (the MH-pFedHN paper's "adding
multiple heads", section 4.3), as for pFedHN.

It runs on MH-pFedHN's machinery: C_i is the client's embedding (tau = its tensor count rows
of n_e), the bank and fc1 are the shared feature extractor, and updates are the VJP steps of
the configured schedule with Adam and clipping as MH-pFedHN's (the paper states no baseline
settings; docs/design/baselines.md, section 3, gives the reasons and the reference's own).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Self

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from common.config import ExperimentConfig
from common.seeding import stable_seed
from server_app.hypernetwork_server import EmbeddedClient, HypernetworkSettings
from server_app.methods.pfedhn import PFedHN, PFedHNServer


class PFedLHNSettings(BaseModel):
    """pFedLHN's generator (defaults of its code, utils.py)."""

    model_config = ConfigDict(extra="forbid")

    bank_size: int = Field(5, gt=0, description="n_e: shared embeddings in the bank E")
    bank_dim: int = Field(40, gt=0, description="e: the width of each shared embedding")
    hidden_dim: int = Field(128, gt=0, description="fc1's output, the heads' input")
    coefficient_std: float = Field(
        0.002, gt=0, description="standard deviation of the initial C_i (the code's norm_var)"
    )


class BankProjection(nn.Sequential):
    """F = fc1(C E): the bank E as a bias-free Linear(n_e, e) whose weight is E^T (so that
    C_i[l] E is one matmul), initialised N(0, 1) as nn.Embedding is, then fc1."""

    def __init__(self, bank_size: int, bank_dim: int, hidden_dim: int) -> None:
        bank = nn.Linear(bank_size, bank_dim, bias=False)
        nn.init.normal_(bank.weight)
        super().__init__(bank, nn.Linear(bank_dim, hidden_dim))


class LayerWiseHeads(nn.Module):
    """One Linear(hidden, numel_l) per tensor l, each fed its own row of features."""

    def __init__(self, hidden_dim: int, sizes: Sequence[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(hidden_dim, n) for n in sizes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., L, hidden) -> (..., sum of numel_l)."""
        return torch.cat([head(features[..., t, :]) for t, head in enumerate(self.heads)], -1)


class PFedLHNServer(PFedHNServer):
    head_class = LayerWiseHeads

    def __init__(self, settings: HypernetworkSettings | None = None, *, bank_dim: int = 40,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(settings, **kwargs)
        s = self.settings
        self.bank_dim = bank_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(self.seed, "bank"))
            self.use_feature_extractor(BankProjection(s.embedding_dim, bank_dim, s.hidden_dim))

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Self:
        own = cfg.method_settings
        settings = dataclasses.replace(
            HypernetworkSettings.from_config(cfg),
            embedding_dim=own.bank_size,
            hidden_dim=own.hidden_dim,
            embedding_std=own.coefficient_std,
        )
        return cls(settings, bank_dim=own.bank_dim, seed=cfg.seed,
                   device=cfg.hypernetwork.device, max_params=cfg.server.max_params,
                   memory_budget=cfg.server.memory_budget_gb,
                   client_memory=cfg.server.client_memory_gb)  # fmt: skip

    # ------------------------------------------------------------- head hooks
    def rows_for(self, key: str, num_params: int) -> int:
        return len(self.sizes_of[key])  # a row of C_i per tensor

    def head_seed(self, index: int) -> int:
        return stable_seed(self.seed, "layer-heads", index)

    def apply_heads(
        self, records: Sequence[EmbeddedClient], features: torch.Tensor
    ) -> list[torch.Tensor]:
        return [self.hnet.heads[r.head](features[i]) for i, r in enumerate(records)]

    def describe(self) -> str:
        return (f"{len(self.clients)} clients, a bank of {self.settings.embedding_dim} "
                f"embeddings, {len(self.architectures)} architectures (a head per tensor), "
                f"{self.num_parameters() / 1e6:.1f}M parameters on {self.device}")  # fmt: skip

    def extra_state(self) -> dict:
        return {**super().extra_state(), "bank_dim": self.bank_dim}

    @classmethod
    def options_from_state(cls, state: Mapping) -> dict:
        return {"bank_dim": int(state["bank_dim"])}


class PFedLHN(PFedHN):
    state: PFedLHNServer
    state_class = PFedLHNServer
