"""The multi-head hypernetwork of MH-pFedHN (docs/concepts/hypernetwork.md), in plain PyTorch.

A shared feature extractor maps every 64-d chunk embedding to a 128-d feature; one head per
distinct chunk count tau maps the j-th feature to the j-th chunk of N parameters. Each head
holds its tau linear maps as one (tau, hidden, N) tensor so a whole client (or a stack of
clients) is generated with a single batched matmul instead of a Python loop over layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FeatureExtractor(nn.Sequential):
    """Linear(e, h) ReLU, then (layers - 1) x [Linear(h, h) ReLU], as the authors' code."""

    def __init__(self, embedding_dim: int, hidden_dim: int, hidden_layers: int) -> None:
        if hidden_layers < 1:
            raise ValueError(f"hidden_layers must be >= 1, got {hidden_layers}")
        layers: list[nn.Module] = [nn.Linear(embedding_dim, hidden_dim), nn.ReLU()]
        for _ in range(hidden_layers - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.ReLU()]
        super().__init__(*layers)


class ChunkHead(nn.Module):
    """tau independent Linear(hidden, N) maps, stored batched; map j sees only chunk j."""

    def __init__(self, tau: int, hidden_dim: int, chunk_size: int) -> None:
        super().__init__()
        self.tau = tau
        self.weight = nn.Parameter(torch.empty(tau, hidden_dim, chunk_size))
        self.bias = nn.Parameter(torch.empty(tau, chunk_size))
        # PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        bound = 1.0 / math.sqrt(hidden_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., tau, hidden) features -> (..., tau, N) chunks."""
        return torch.einsum("...th,thn->...tn", features, self.weight) + self.bias


class MultiHeadHypernetwork(nn.Module):
    """Feature extractor plus heads keyed by tau (created on demand)."""

    def __init__(
        self,
        *,
        chunk_size: int = 3072,
        embedding_dim: int = 64,
        hidden_dim: int = 128,
        hidden_layers: int = 3,
    ) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.embedding_dim = embedding_dim
        self.hidden_dim = hidden_dim
        self.feature_extractor = FeatureExtractor(embedding_dim, hidden_dim, hidden_layers)
        self.heads = nn.ModuleDict()

    @staticmethod
    def head_name(tau: int) -> str:
        return f"tau{tau}"

    def has_head(self, tau: int) -> bool:
        return self.head_name(tau) in self.heads

    def head(self, tau: int) -> ChunkHead:
        return self.heads[self.head_name(tau)]

    def add_head(self, tau: int) -> ChunkHead:
        """Create the head for tau on the extractor's device; an existing head is kept."""
        if not self.has_head(tau):
            device = next(self.feature_extractor.parameters()).device
            self.heads[self.head_name(tau)] = ChunkHead(tau, self.hidden_dim, self.chunk_size).to(
                device
            )
        return self.head(tau)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(..., tau, e) embeddings of one or more clients with the same tau -> (..., tau * N)."""
        tau = embeddings.shape[-2]
        chunks = self.head(tau)(self.feature_extractor(embeddings))
        return chunks.flatten(-2)

    def generate(self, embeddings: torch.Tensor, num_params: int) -> torch.Tensor:
        """theta = concat(chunk_1..chunk_tau)[:K] for one client ((tau, e) embeddings)."""
        return self(embeddings)[..., :num_params]
