"""The pFedHN baseline (Shamsian et al., ICML 2021): one embedding per client, the same feature
extractor as MH-pFedHN, and one linear head per parameter tensor of the client's architecture,
whose tensor sizes clients report. Clients of different architectures get a set of heads each
(the MH-pFedHN paper's "adding multiple heads", section 4.3), all on the one shared feature
extractor. It is MH-pFedHN's round (VJP, clipping, Adam, the schedules) with other heads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from common import protocol
from common.seeding import stable_seed
from server_app.hypernetwork_server import EmbeddedClient, HypernetworkServer
from server_app.methods.mh_pfedhn import MHpFedHN
from server_app.round_loop import logger
from server_app.server_state import ClientRecord, RegistrationError


class PerTensorHeads(nn.Module):
    """pFedHN's heads: one Linear(hidden, numel) per parameter tensor of the target model."""

    def __init__(self, hidden_dim: int, sizes: Sequence[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(hidden_dim, n) for n in sizes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(features) for head in self.heads], dim=-1)


def head_name(index: int) -> str:
    """The first architecture's heads keep the name of the single-architecture version, so
    its checkpoints still load."""
    return "pertensor" if index == 0 else f"pertensor{index}"


def head_index(name: str) -> int:
    return int(name.removeprefix("pertensor") or 0)


class PFedHNServer(HypernetworkServer):
    head_class: type[nn.Module] = PerTensorHeads  # what generates an architecture's tensors

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.architectures: list[tuple[int, ...]] = []  # tensor sizes, in order of arrival
        self.sizes_of: dict[str, tuple[int, ...]] = {}  # client key -> its tensor sizes

    def set_tensor_sizes(self, key: str, sizes: Sequence[int] | None) -> None:
        """Note the tensor sizes `key` reports (its heads are made when it registers). A key
        keeps its architecture: other sizes later are refused."""
        if not sizes or not all(isinstance(n, int) and n > 0 for n in sizes):
            raise RegistrationError("pFedHN needs the client's parameter tensor sizes")
        signature = tuple(int(n) for n in sizes)
        if key in self.clients and self.sizes_of[key] != signature:
            raise RegistrationError(
                f"client {key!r} reported other tensor sizes than when it registered"
            )
        self.sizes_of[key] = signature

    def architecture(self, key: str) -> int:
        """The index of `key`'s architecture (in order of first registration)."""
        return self.architectures.index(self.sizes_of[key])

    def heads_of(self, key: str) -> nn.Module:
        """The heads that generate `key`'s architecture (pFedHN's per tensor, pFedLHN's
        layer-wise)."""
        return self.hnet.heads[self.record(key).head]

    # ------------------------------------------------------------- head hooks
    def rows_for(self, key: str, num_params: int) -> int:
        return 1  # one embedding vector per client

    def head_for(self, key: str, num_params: int) -> str:
        signature = self.sizes_of[key]
        known = signature in self.architectures
        return head_name(self.architectures.index(signature) if known else len(self.architectures))

    def head_weights(self, key: str, num_params: int) -> int:
        return sum(self.sizes_of[key]) * (self.settings.hidden_dim + 1)

    def make_head(self, key: str, num_params: int) -> nn.Module:
        """The heads of a new architecture (the `index`-th), seeded by `head_seed`."""
        index, signature = len(self.architectures), self.sizes_of[key]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.head_seed(index))
            heads = self.head_class(self.settings.hidden_dim, signature)
        self.architectures.append(signature)
        return heads

    def head_seed(self, index: int) -> int:
        return self.seed if index == 0 else stable_seed(self.seed, "heads", index)

    def apply_heads(
        self, records: Sequence[EmbeddedClient], features: torch.Tensor
    ) -> list[torch.Tensor]:
        return [self.hnet.heads[r.head](features[i])[0] for i, r in enumerate(records)]

    def head_order(self, heads: set[str]) -> list[str]:
        return sorted(heads, key=head_index)

    # --------------------------------------------------------------- registry
    def register(self, key: str, num_params: object) -> EmbeddedClient:
        """As MH-pFedHN's, once the reported tensor sizes match K; a refused client leaves
        nothing behind."""
        try:
            k = self.registry.check(key, num_params)
            signature = self.sizes_of.get(key)
            if signature is None:
                raise RegistrationError(f"client {key!r} has not reported its tensor sizes")
            if k != sum(signature):
                raise RegistrationError(f"K={k} does not match the tensor sizes reported")
            return super().register(key, k)
        except RegistrationError:
            if key not in self.clients:
                self.sizes_of.pop(key, None)
            raise

    def describe(self) -> str:
        return (
            f"{len(self.clients)} clients, {len(self.architectures)} architectures (a head per "
            f"tensor), {self.num_parameters() / 1e6:.1f}M parameters on {self.device}"
        )

    def extra_state(self) -> dict:
        return {"sizes_of": {k: list(self.sizes_of[k]) for k in self.clients}}

    def restore_extra(self, state: Mapping) -> None:
        if "sizes_of" in state:
            self.sizes_of = {k: tuple(v) for k, v in state["sizes_of"].items()}
        else:  # a checkpoint of the single-architecture version
            self.sizes_of = {k: tuple(state["tensor_sizes"]) for k, _ in state["clients"]}


class PFedHN(MHpFedHN):
    state: PFedHNServer
    state_class = PFedHNServer

    def register(self, identity: protocol.Identity) -> ClientRecord:
        self.state.set_tensor_sizes(identity.client_key, identity.extras[protocol.TENSOR_SIZES])
        return super().register(identity)

    def log_admission(self, identity: protocol.Identity, record: ClientRecord | None) -> None:
        if record is None:
            return
        key = identity.client_key
        logger.info("client %s: K=%d, architecture %d (%d tensors)", key, record.num_params,
                    self.state.architecture(key), len(self.state.sizes_of[key]))  # fmt: skip
