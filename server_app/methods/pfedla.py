"""pFedLA (Ma, Zhang, Guo and Xu, "Layer-wised Model Aggregation for Personalized Federated
Learning", CVPR 2022; docs/design/baselines.md, section 1). The server keeps every client's
latest parameters theta_j and, per client i, a small hypernetwork psi_i (an embedding, an MLP,
one head per parameter tensor l) whose output a_i^l = ReLU(W_i^l f_i + b_i^l) >= 0 gives the
layer-wise aggregation weights alpha_i^l = a_i^l / sum_j a_ij^l over all clients. Client i
trains the mixed model thetabar_i^l = sum_j alpha_ij^l theta_j^l (a one-hot self weight if all
a are 0) and returns delta_i = thetabar_i - trained_i; the server steps psi_i by SGD on the
VJP of thetabar_i with delta_i (pFedHN's descent direction: the reference code's ascends,
`pfedla.hn_sign: reference` reproduces it) and keeps theta_i <- trained_i.

Homogeneous models only: the clients' tensors are mixed element by element. The client set is
fixed (the heads have one output per client): data.num_clients of them, registered in order.
Under `one_by_one` a client's mix already holds the models trained before it this round (the
reference's sequential round); parallel schedules mix and step against the round's start. With
clients in flight (`hypernetwork.in_flight` > 1), a client's mix and step use the models as they
were when its mix was sent, kept until its delta is applied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Self

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from common import protocol
from common.config import ExperimentConfig
from common.seeding import stable_seed
from server_app.round_loop import RoundLoop, logger
from server_app.server_state import ClientRecord, ClientRegistry, RegistrationError


class PFedLASettings(BaseModel):
    """pFedLA's hypernetworks: the reference code's sizes (args.py / pfedla.py); its learning
    rate chosen by validation accuracy here (docs/design/baselines.md, 1.6): the step is
    proportional to the client's delta, and one local epoch makes far smaller deltas than the
    reference's ten, so its 5e-3 leaves the weights near uniform after 150 rounds."""

    model_config = ConfigDict(extra="forbid")

    embedding_dim: int = Field(100, gt=0, description="each client's embedding")
    hidden_dim: int = Field(100, gt=0, description="the width of the 3-layer MLP")
    hn_lr: float = Field(
        50.0,
        gt=0,
        description="SGD learning rate of a client's hypernetwork (the reference "
        "code's 5e-3 suits its 10 local epochs; chosen by validation for one)",
    )
    hn_sign: Literal["descent", "reference"] = Field(
        "descent",
        description="descent: step along -J^T delta (pFedHN's direction, the mix moves towards "
        "the trained model); reference: the reference code's opposite sign",
    )


class AggregationNet(nn.Module):
    """psi_i: embedding e_i (N(0,1)), 3 x [Linear, ReLU], a head per tensor with U(0,1)
    weights and zero bias, ReLU: a_i^l >= 0, one entry per client."""

    def __init__(self, settings: PFedLASettings, tensors: int, clients: int) -> None:
        super().__init__()
        e, h = settings.embedding_dim, settings.hidden_dim
        self.embedding = nn.Parameter(torch.randn(e))
        self.mlp = nn.Sequential(nn.Linear(e, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                 nn.Linear(h, h), nn.ReLU())  # fmt: skip
        self.heads = nn.ModuleList(nn.Linear(h, clients) for _ in range(tensors))
        for head in self.heads:
            nn.init.uniform_(head.weight, 0.0, 1.0)
            nn.init.zeros_(head.bias)

    def forward(self) -> torch.Tensor:
        """(tensors, clients) non-negative raw weights a_i."""
        features = self.mlp(self.embedding)
        return torch.stack([torch.relu(head(features)) for head in self.heads])


def normalised(raw: torch.Tensor, own: int) -> torch.Tensor:
    """alpha = a / sum_j a per tensor (row); a row of zeros weighs the client itself only."""
    total = raw.sum(dim=1, keepdim=True)
    self_only = torch.zeros_like(raw)
    self_only[:, own] = 1.0
    return torch.where(total > 0, raw / total.clamp_min(1e-30), self_only)


def mixed(alpha: torch.Tensor, models: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """thetabar^l = sum_j alpha^l_j theta_j^l for each tensor l (bounds: its start offsets
    and K), from (tensors, clients) weights and (clients, K) models."""
    parts = [alpha[t] @ models[:, bounds[t] : bounds[t + 1]] for t in range(len(bounds) - 1)]
    return torch.cat(parts)


class PFedLAServer(ClientRegistry):
    """Every client's model, and every client's aggregation network with its optimiser."""

    def __init__(self, seed: int, max_params: int, settings: PFedLASettings | None = None,
                 capacity: int = 10) -> None:  # fmt: skip
        super().__init__(seed, max_params)
        self.settings = settings or PFedLASettings()
        self.capacity = capacity  # N: the heads have one output per client
        self.sizes: tuple[int, ...] | None = None
        self.models: torch.Tensor | None = None  # (N, K): row j is client j's latest theta
        self.nets: dict[str, AggregationNet] = {}
        self.optimizers: dict[str, torch.optim.SGD] = {}
        self.sent_from: dict[str, tuple[int, torch.Tensor]] = {}  # (round, models) in flight

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Self:
        if cfg.data.num_clients == "auto":
            raise RegistrationError("pFedLA needs data.num_clients: one head output per client")
        return cls(cfg.seed, cfg.server.max_params, cfg.method_settings, int(cfg.data.num_clients))

    @property
    def bounds(self) -> list[int]:
        return [0, *np.cumsum(self.sizes).tolist()]

    def index(self, key: str) -> int:
        return list(self.clients).index(key)

    def register_client(
        self, key: str, num_params: object, sizes: Sequence[int], initial: np.ndarray | None
    ) -> ClientRecord:
        """The first client fixes the architecture (its tensor sizes) and every model's start
        (its initial vector); later ones must match. At most `capacity` clients."""
        k = self.check(key, num_params)
        if key in self.clients:
            return self.clients[key]
        signature = tuple(int(n) for n in sizes)
        if sum(signature) != k:
            raise RegistrationError(f"K={k} does not match the tensor sizes reported")
        if self.sizes is not None and signature != self.sizes:
            raise RegistrationError("pFedLA mixes one architecture: other tensor sizes")
        if len(self.clients) >= self.capacity:
            raise RegistrationError(f"pFedLA's hypernetworks weigh {self.capacity} clients "
                                    "(data.num_clients): no room for another")  # fmt: skip
        if self.models is None:
            if initial is None or initial.shape != (k,):
                raise RegistrationError("pFedLA needs the first client's initial parameters")
            self.sizes = signature
            self.models = torch.from_numpy(np.array(initial, np.float32)).repeat(self.capacity, 1)
        record = self.register(key, k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(self.seed, "pfedla", key))
            net = AggregationNet(self.settings, len(self.sizes), self.capacity)
        self.nets[key] = net
        self.optimizers[key] = torch.optim.SGD(net.parameters(), lr=self.settings.hn_lr)
        return record

    def weights(self, key: str) -> torch.Tensor:
        """alpha_i: (tensors, clients), each row non-negative and summing to one."""
        return normalised(self.nets[key](), self.index(key))

    def generate(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        return {k: self.mix(k, self.models).numpy() for k in keys}

    def mix(self, key: str, models: torch.Tensor) -> torch.Tensor:
        """Client `key`'s mix of `models` (its network moves only when its own delta is
        applied, so this is the mix it was sent if `models` are those it was made from)."""
        with torch.no_grad():
            return mixed(self.weights(key), models, self.bounds)

    def remember_models(self, server_round: int, keys: Sequence[str]) -> None:
        """Keep the models these clients' mixes are made from now, until their deltas are
        applied (other cohorts' models change meanwhile); earlier rounds' entries go."""
        models = self.models.clone()
        self.sent_from = {k: v for k, v in self.sent_from.items() if v[0] == server_round}
        self.sent_from.update(dict.fromkeys(keys, (server_round, models)))

    def models_sent_to(self, key: str, server_round: int, current: torch.Tensor) -> torch.Tensor:
        """The models `key`'s mix of this round was made from: those remembered, or `current`."""
        sent_round, models = self.sent_from.pop(key, (None, current))
        return models if sent_round == server_round else current

    def step(self, key: str, delta: np.ndarray, models: torch.Tensor) -> None:
        """psi_i <- psi_i - lr J^T delta, the mix taken over `models` (those the client's
        mix was made from: `models_sent_to`): d<thetabar, delta>/d alpha^l_j =
        <theta_j^l, delta^l>, so the gradient flows back through alpha alone, without a graph
        over all K x N entries."""
        direction = torch.from_numpy(np.asarray(delta, np.float32))
        if self.settings.hn_sign == "reference":
            direction = -direction
        spans = zip(self.bounds, self.bounds[1:], strict=False)
        pull = torch.stack([models[:, a:b] @ direction[a:b] for a, b in spans])
        optimizer = self.optimizers[key]
        optimizer.zero_grad()
        self.weights(key).backward(pull)
        optimizer.step()

    def keep(self, key: str, trained: np.ndarray) -> None:
        self.models[self.index(key)] = torch.from_numpy(np.asarray(trained, np.float32))

    def describe(self) -> str:
        return (f"{len(self.clients)} of {self.capacity} clients, their models and one "
                f"aggregation network each")  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {**self.registry_state(), "settings": self.settings.model_dump(),
                "capacity": self.capacity, "sizes": list(self.sizes or ()),
                "models": self.models,
                "nets": {k: n.state_dict() for k, n in self.nets.items()}}  # fmt: skip

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str = "cpu", **_: Any) -> Self:
        server = cls(state["seed"], state["max_params"], PFedLASettings(**state["settings"]),
                     state["capacity"])  # fmt: skip
        models = state["models"]
        for key, k in state["clients"]:
            initial = None if models is None else models[0].numpy()
            server.register_client(key, k, state["sizes"], initial)
        server.models = models
        for key, net_state in state["nets"].items():
            server.nets[key].load_state_dict(net_state)
        return server


class PFedLA(RoundLoop):
    state: PFedLAServer
    state_class = PFedLAServer

    def register(self, identity: protocol.Identity) -> ClientRecord:
        return self.state.register_client(identity.client_key, identity.num_params,
                                          identity.extras[protocol.TENSOR_SIZES],
                                          identity.extras.get(protocol.INITIAL))  # fmt: skip

    def federation_value(self, identity: protocol.Identity) -> Any:
        return tuple(identity.extras.get(protocol.TENSOR_SIZES) or ())  # the architecture

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The train messages; with clients in flight, later cohorts' are sent before this
        one is applied, so the models these mixes come from are kept."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.schedule.in_flight > 1:
            self.state.remember_models(server_round, [self.key_of(m) for m in messages])
        return messages

    def apply_train(
        self, server_round: int, results: Mapping[str, protocol.TrainResult]
    ) -> dict[str, str]:
        """Each client's network steps against the models its mix was made from (the
        cohort's start, or what was kept when it was sent), then its trained model is kept."""
        current = self.state.models.clone()
        origin = {k: self.state.models_sent_to(k, server_round, current) for k in results}
        sent = {k: self.state.mix(k, origin[k]).numpy() for k in results}  # what they trained
        for key in sorted(results):
            self.state.step(key, results[key].delta, origin[key])
        for key in sorted(results):
            self.state.keep(key, sent[key] - results[key].delta)
        logger.debug("round %d: pFedLA stepped %d clients", server_round, len(results))
        return {}
