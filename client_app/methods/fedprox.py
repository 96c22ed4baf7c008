"""FedProx's client (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys
2020): FedAvg's round, with a proximal term mu/2 ||w - w_received||^2 added to every batch's
loss, which keeps a client's update close to the global model it received.

The whole method is this module and its registry entry: the server is FedAvg's, and `mu` is
read by each client from the run's configuration (`fedprox.mu`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from flwr.app import Message
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from client_app.methods.fedavg import InitialVectorClient
from client_app.session import Session
from client_app.training import Objective


class FedProxSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mu: float = Field(
        0.01,
        ge=0.0,
        description="weight of the proximal term mu/2 ||w - w_received||^2 (the FedProx "
        "paper tunes it over 0.001, 0.01, 0.1 and 1); 0 is FedAvg",
    )


@dataclass(frozen=True)
class ProximalTerm(Objective):
    mu: float
    anchor: list[torch.Tensor]  # the received parameters, in `parameters()` order

    def __call__(
        self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        distance = sum((p - a).pow(2).sum() for p, a in zip(params, self.anchor, strict=True))
        return F.cross_entropy(logits, y) + 0.5 * self.mu * distance


class FedProxClient(InitialVectorClient):
    def objective(self, session: Session, msg: Message, model: nn.Module) -> Objective:
        anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        return ProximalTerm(session.cfg.method_settings.mu, anchor)
