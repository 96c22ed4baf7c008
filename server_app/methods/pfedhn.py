"""The pFedHN baseline (Shamsian et al., 2021): one embedding per client, the same feature
extractor as MH-pFedHN, and one linear head per parameter tensor of the client's architecture,
whose tensor sizes clients report. Clients of different architectures get a set of heads each
(the paper's "adding multiple heads", section 4.3), all on the one shared feature extractor.
It runs on the same server machinery (VJP, clipping, Adam, the round schedules), so only the
generator differs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from common import protocol
from common.seeding import stable_seed
from server_app.hypernetwork_rounds import HypernetworkRounds
from server_app.hypernetwork_server import HypernetworkServer
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


class PFedHNServer(HypernetworkServer):
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

    def heads_of(self, key: str) -> PerTensorHeads:
        return self.hnet.heads[head_name(self.architecture(key))]

    def _register(self, key: str, num_params: object) -> ClientRecord:
        """As MH-pFedHN's: a new architecture's heads are made right before the embeddings of
        its first client, so a checkpoint replaying the registrations rebuilds the optimizer's
        parameter groups in the same order."""
        try:
            k = self.registry.check(key, num_params)
            signature = self.sizes_of.get(key)
            if signature is None:
                raise RegistrationError(f"client {key!r} has not reported its tensor sizes")
            if k != sum(signature):
                raise RegistrationError(f"K={k} does not match the tensor sizes reported")
            if key in self.clients:
                return self.clients[key]
            if signature not in self.architectures:
                weights = sum(signature) * (self.settings.hidden_dim + 1)
                self.check_budget(weights, "pFedHN's heads")
        except RegistrationError:
            if key not in self.clients:  # a refused client leaves nothing behind
                self.sizes_of.pop(key, None)
            raise
        if signature not in self.architectures:
            self._add_heads(signature)
        self.clients[key] = ClientRecord(key, k, 1, self._add_embedding(key, 1))
        return self.clients[key]

    def _add_heads(self, signature: tuple[int, ...]) -> None:
        index = len(self.architectures)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed if index == 0 else stable_seed(self.seed, "heads", index))
            heads = PerTensorHeads(self.settings.hidden_dim, signature).to(self.device)
        self.hnet.heads[head_name(index)] = heads
        self.optimizer.add_param_group({"params": list(heads.parameters())})
        self.architectures.append(signature)

    def _generate_group(self, keys: Sequence[str]) -> list[torch.Tensor]:
        features = self.hnet.feature_extractor(torch.stack([self.embedding(k) for k in keys]))
        return [self.heads_of(k)(features[i])[0] for i, k in enumerate(keys)]

    def _involved_parameters(self, keys: Sequence[str]) -> list[nn.Parameter]:
        params = list(self.hnet.feature_extractor.parameters())
        for index in sorted({self.architecture(k) for k in keys}):
            params += list(self.hnet.heads[head_name(index)].parameters())
        return params + [self.embedding(k) for k in keys]

    def describe(self) -> str:
        return (
            f"{len(self.clients)} clients, {len(self.architectures)} architectures (a head per "
            f"tensor), {self.num_parameters() / 1e6:.1f}M parameters on {self.device}"
        )

    def state_dict(self) -> dict:
        sizes_of = {k: list(self.sizes_of[k]) for k in self.clients}
        return {**super().state_dict(), "sizes_of": sizes_of}

    def _restore_structure(self, state: dict) -> None:
        if "sizes_of" in state:
            self.sizes_of = {k: tuple(v) for k, v in state["sizes_of"].items()}
        else:  # a checkpoint of the single-architecture version
            self.sizes_of = {k: tuple(state["tensor_sizes"]) for k, _ in state["clients"]}


class PFedHN(HypernetworkRounds):
    state: PFedHNServer

    def register(self, identity: protocol.Identity) -> ClientRecord:
        self.state.set_tensor_sizes(identity.client_key, identity.tensor_sizes)
        return super().register(identity)

    def log_admission(self, identity: protocol.Identity, record: ClientRecord | None) -> None:
        if record is None:
            return
        key = identity.client_key
        logger.info("client %s: K=%d, architecture %d (%d tensors)", key, record.num_params,
                    self.state.architecture(key), len(self.state.sizes_of[key]))  # fmt: skip
