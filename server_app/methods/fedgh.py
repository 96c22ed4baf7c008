"""FedGH (Yi et al., ACM MM 2023; docs/design/baselines.md, section 2): heterogeneous private
feature extractors with one shared prediction header H, a Linear(d, C). Each round the
server sends H to every client (its vector), clients train their whole model with it and send
back the mean representation of each class they hold (client_app/methods/fedgh.py); the
server trains H on these (representation, class) pairs with cross-entropy and SGD, and sends
the new H the next round. The server learns each client's classes and class-mean
representations, and d and C; never an extractor's parameters or a sample.

The official code steps the wrong optimiser, so its header never trains (design notes, D1);
this follows HtFLlib's working procedure: a fresh SGD each round, `server_epochs` epochs over
the round's pairs in a seeded order. The header starts from a seeded Linear(d, C) made by the
server (not from what a client reports)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Self

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, Message
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from client_app.methods.fedgh import PROTO_CLASSES, PROTO_VALUES, REP_DIM
from common import protocol
from common.config import ExperimentConfig
from common.param_vector import model_to_vector, vector_to_model
from common.seeding import stable_seed
from server_app.round_loop import RoundLoop
from server_app.server_state import ClientRecord, ClientRegistry, RegistrationError

HEADER = "header"


class FedGHSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server_lr: float = Field(0.01, gt=0, description="SGD learning rate of the header")
    server_epochs: int = Field(100, gt=0, description="epochs over the round's prototypes")
    server_batch_size: int = Field(64, gt=0, description="prototypes per header step")
    max_proto_abs: float = Field(
        1e4, gt=0, description="a prototype entry larger than this in absolute value is refused"
    )


def train_header(
    header: nn.Linear,
    features: torch.Tensor,
    labels: torch.Tensor,
    settings: FedGHSettings,
    generator: torch.Generator,
) -> None:
    """Cross-entropy SGD on (representation, class) pairs, in place (no momentum, a fresh
    optimiser: nothing carries over from the round before)."""
    optimizer = torch.optim.SGD(header.parameters(), lr=settings.server_lr)
    for _ in range(settings.server_epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), settings.server_batch_size):
            idx = order[start : start + settings.server_batch_size]
            optimizer.zero_grad()
            F.cross_entropy(header(features[idx]), labels[idx]).backward()
            optimizer.step()


class FedGHServer(ClientRegistry):
    """The shared header (a Linear(d, C) as a vector: weight row-major, then bias) and the
    clients, who must all share d and C."""

    def __init__(self, seed: int, max_params: int, settings: FedGHSettings | None = None) -> None:
        super().__init__(seed, max_params)
        self.settings = settings or FedGHSettings()
        self.header: nn.Linear | None = None

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Self:
        return cls(cfg.seed, cfg.server.max_params, cfg.method_settings)

    def register_header(self, key: str, num_params: object, rep_dim: int) -> ClientRecord:
        """A client with a header of K = C (d + 1) parameters; the first one fixes d and C
        (the header is then made, seeded)."""
        k = self.check(key, num_params)
        if k % (rep_dim + 1):
            raise RegistrationError(f"K={k} is no header of width d={rep_dim}: C (d + 1) expected")
        if self.header is not None and (k, rep_dim) != (self.num_params, self.rep_dim):
            raise RegistrationError(
                f"FedGH shares one header: this client's is Linear({rep_dim}, "
                f"{k // (rep_dim + 1)}), the federation's Linear({self.rep_dim}, "
                f"{self.num_classes})"
            )
        if self.header is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(stable_seed(self.seed, "fedgh-header"))
                self.header = nn.Linear(rep_dim, k // (rep_dim + 1))
        return self.register(key, k)

    @property
    def rep_dim(self) -> int:
        return self.header.in_features

    @property
    def num_classes(self) -> int:
        return self.header.out_features

    @property
    def num_params(self) -> int:
        return self.num_classes * (self.rep_dim + 1)

    def vector(self) -> np.ndarray:
        return model_to_vector(self.header).numpy()

    def generate(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        vector = self.vector()
        return dict.fromkeys(keys, vector)

    def update(self, pairs: Sequence[tuple[int, np.ndarray]], server_round: int) -> None:
        """Train the header on (class, representation) pairs, given in a fixed order."""
        if not pairs or self.header is None:
            return
        labels = torch.tensor([c for c, _ in pairs], dtype=torch.long)
        features = torch.from_numpy(np.stack([v for _, v in pairs]).astype(np.float32))
        generator = torch.Generator().manual_seed(stable_seed(self.seed, "fedgh", server_round))
        train_header(self.header, features, labels, self.settings, generator)

    def describe(self) -> str:
        shape = "none yet" if self.header is None else f"Linear({self.rep_dim}, {self.num_classes})"
        return f"{len(self.clients)} clients, one shared header: {shape}"

    def state_dict(self) -> dict[str, Any]:
        header = None if self.header is None else torch.from_numpy(self.vector())
        shape = None if self.header is None else [self.rep_dim, self.num_classes]
        return {**self.registry_state(), "header": header, "header_shape": shape,
                "settings": self.settings.model_dump()}  # fmt: skip

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str = "cpu", **_: Any) -> Self:
        server = cls.from_registry_state(state)
        server.settings = FedGHSettings(**state["settings"])
        if state["header"] is not None:
            server.header = nn.Linear(*state["header_shape"])
            vector_to_model(server.header, np.asarray(state["header"], np.float32))
        return server


class FedGH(RoundLoop):
    state: FedGHServer
    state_class = FedGHServer

    def register(self, identity: protocol.Identity) -> ClientRecord:
        rep_dim = identity.extras[REP_DIM]
        return self.state.register_header(identity.client_key, identity.num_params, rep_dim)

    def federation_value(self, identity: protocol.Identity) -> Any:
        return identity.num_params, identity.extras.get(REP_DIM)  # the header's shape

    def parse_train(self, key: str, reply: Message) -> protocol.TrainResult:
        """Prototypes, not a delta: n classes below C, n x d finite values within bounds."""
        result = protocol.parse_local_train_reply(reply, self.wire.returns)
        classes, values = result.extras[PROTO_CLASSES], result.extras[PROTO_VALUES]
        d, limit = self.state.rep_dim, self.state.settings.max_proto_abs
        if classes.size and classes.max() >= self.state.num_classes:
            raise protocol.ReplyError(f"a prototype of class {int(classes.max())} (C = "
                                      f"{self.state.num_classes})")  # fmt: skip
        if values.shape != (classes.size, d):
            raise protocol.ReplyError(f"{PROTO_VALUES!r} has shape {values.shape}, expected "
                                      f"({classes.size}, {d})")  # fmt: skip
        if values.size and float(np.abs(values).max()) > limit:
            raise protocol.ReplyError(f"a prototype entry above {limit:g} (fedgh.max_proto_abs)")
        return result

    def apply_train(
        self, server_round: int, results: Mapping[str, protocol.TrainResult]
    ) -> dict[str, str]:
        """The header trains on every (class, prototype) pair of the round, in key order."""
        pairs = [(int(c), v) for k in sorted(results)
                 for c, v in zip(results[k].extras[PROTO_CLASSES],
                                 results[k].extras[PROTO_VALUES], strict=True)]  # fmt: skip
        self.state.update(pairs, server_round)
        return {}

    def global_arrays(self) -> ArrayRecord:
        if self.state.header is None:
            return ArrayRecord()
        return ArrayRecord({HEADER: Array(self.state.vector())})
