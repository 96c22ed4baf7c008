"""FedAKT's client, as reconstructed here (Liu et al., "Adapter-guided knowledge transfer for
heterogeneous federated learning", J. Systems Architecture 159, 2025; no code or full text is
public: docs/design/baselines.md, section 5, gives every choice and why). Results of this
method are "FedAKT (our reconstruction)".

Each client keeps its own model (a private extractor phi_i and header g_i, the zoo model's
last Linear) and adds a small adapter A that every client shares: a convolutional feature
extractor of the same width as phi_i's representation. Per batch it minimises
    CE(g_i(phi_i(x)), y) + CE(g_i(A(x)), y) + mu MSE(phi_i(x), A(x))
(the header learns from both feature sources, HDU; the two feature extractors distil into
each other, FMD), predicts with g_i(phi_i(x)), and sends only A's change; the server averages
the adapters as FedAvg does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Message, RecordDict
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from client_app.method import ClientMethod, TrainJob
from client_app.methods.fedgh import header_name
from client_app.session import Layout, Session
from client_app.training import Objective
from common import protocol
from common.param_vector import model_to_vector, vector_to_model
from common.seeding import stable_seed


class FedAKTSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fmd_weight: float = Field(
        1.0, ge=0.0, description="mu: the weight of the MSE between the two feature "
        "extractors' outputs (FMD)",
    )  # fmt: skip
    hdu: bool = Field(
        True, description="the header also learns from the adapter's features (a second "
        "cross-entropy term); off: only the FMD term reaches A",
    )  # fmt: skip
    predict: Literal["local", "adapter", "sum"] = Field(
        "local", description="what a client predicts with: the header on its own features, "
        "on the shared adapter's, or the sum of both logits",
    )  # fmt: skip


class Adapter(nn.Sequential):
    """The shared adapter: 3 x 3 convolutions 16, 32, 64 wide (ReLU, max-pooling after the
    first two), global average pooling: a `width`-d feature per image."""

    def __init__(self, in_channels: int, width: int = 64) -> None:
        super().__init__(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip


class WithAdapter(nn.Module):
    """The client's model and the adapter side by side: forward predicts with the client's
    own features, and keeps both feature sets for the loss."""

    def __init__(self, private: nn.Module, adapter: Adapter, predict: str = "local") -> None:
        super().__init__()
        self.private, self.adapter, self.predict = private, adapter, predict
        self.header = private.get_submodule(header_name(private))
        self.features: dict[str, torch.Tensor] = {}
        self.header.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.features["local"] = inputs[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of `predict` (training: local, the loss adds the adapter's)."""
        logits = self.private(x)
        self.features["adapter"] = self.adapter(x)
        if self.predict == "local":
            return logits
        adapted = self.header(self.features["adapter"])
        return adapted if self.predict == "adapter" else logits + adapted


@dataclass(frozen=True)
class AdapterObjective(Objective):
    fmd_weight: float
    hdu: bool

    def __call__(
        self, model: WithAdapter, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        local, adapted = model.features["local"], model.features["adapter"]
        loss = F.cross_entropy(logits, y)
        if self.fmd_weight:  # (at 0, the adapter stays out of the graph: no decay either)
            loss = loss + self.fmd_weight * F.mse_loss(local, adapted)
        if self.hdu:
            loss = loss + F.cross_entropy(model.header(adapted), y)
        return loss


def new_adapter(session: Session) -> Adapter:
    """The adapter as every client starts it: seeded by the run only, so all start alike."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stable_seed(session.cfg.seed, "fedakt-adapter"))
        adapter = Adapter(session.data.in_channels)
    return adapter.to(torch.device(session.cfg.client.device))


class AdapterClient(ClientMethod):
    reports = (protocol.Floats(protocol.INITIAL, required=False),)

    def query(self, session: Session, msg: Message) -> RecordDict:
        """K of the adapter (all that travels), and its seeded initial parameters."""
        adapter = model_to_vector(new_adapter(session)).numpy().astype(np.float32)
        return protocol.identity_reply(session.spec.key, adapter.size, role=session.spec.role,
                                       proof=session.proof(),
                                       extras={protocol.INITIAL: adapter})  # fmt: skip

    def prepare_train(self, session: Session, msg: Message) -> TrainJob:
        theta = protocol.read_theta(msg)
        session.note_received(msg, theta)
        adapter = new_adapter(session)
        vector_to_model(adapter, theta)
        settings = session.cfg.method_settings
        model = WithAdapter(session.local_model(), adapter, settings.predict)
        evaluation = session.evaluate_first(msg, model)  # as it predicts, before training
        model.predict = "local"  # the loss adds the adapter's own term
        return TrainJob(
            session, msg, model, session.spec.model_name, Layout(None, [], []),
            session.generator("train", protocol.read_round(msg)),
            AdapterObjective(settings.fmd_weight, settings.hdu), self.answer_train, theta,
            evaluation,
        )  # fmt: skip

    def answer_train(self, job: TrainJob, loss: float) -> RecordDict:
        """The adapter's change; the client's own model is kept."""
        job.session.save_local_model(job.model.private)
        delta = job.theta - model_to_vector(job.model.adapter).numpy()
        n = len(job.session.data.y_train)
        return protocol.train_reply(delta, n, loss, top_p=job.session.upload_top_p(),
                                    evaluation=job.evaluation)  # fmt: skip

    def evaluate(self, session: Session, msg: Message) -> RecordDict:
        """The client's own model with the received adapter, predicting as configured."""
        theta = protocol.read_theta(msg)
        session.note_received(msg, theta)  # the operator's message log, as for every vector
        adapter = new_adapter(session)
        vector_to_model(adapter, theta)
        model = WithAdapter(session.local_model(), adapter, session.cfg.method_settings.predict)
        return protocol.evaluate_reply(session.evaluate(model))
