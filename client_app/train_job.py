"""One train / train.global message made ready to train, trained, and answered."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Message, RecordDict
from torch import nn

from client_app.session import GLOBAL_BUFFERS, GLOBAL_RECEIVED, GLOBAL_TRAINED, Layout, Session
from client_app.training import Distillation, train_sgd
from common import protocol
from common.param_vector import model_to_vector, vector_to_model


@dataclass
class TrainJob:
    """One train / train.global message made ready: the model holds theta (with this
    client's BatchNorm statistics and local layers). `run` trains it here; the batched
    engine (client_app/batched.py) trains many jobs of one architecture at once instead.
    `reply` then answers the message from the trained model, either way."""

    session: Session
    msg: Message
    model: nn.Module
    theta: np.ndarray
    layout: Layout
    generator: torch.Generator
    distillation: Distillation | None
    global_model: bool
    evaluation: protocol.EvalResult | None = None  # of theta before training, if asked

    @classmethod
    def prepare(cls, session: Session, msg: Message, global_model: bool) -> TrainJob:
        model = session.model(global_model)
        layout = Layout(None, [], []) if global_model else session.layout(model)
        theta = protocol.read_theta(msg)
        session.note_received(msg, theta)
        vector_to_model(model, theta, layout.shared)
        purpose = "train-global" if global_model else "train"
        generator = session.generator(purpose, protocol.read_round(msg))
        distillation = None if global_model else _teacher(session, msg)
        evaluation = session.evaluate_first(msg, model)
        return cls(session, msg, model, theta, layout, generator, distillation, global_model,
                   evaluation)  # fmt: skip

    @property
    def architecture(self) -> str:
        cfg = self.session.cfg
        return cfg.global_model.architecture if self.global_model else self.session.spec.model_name

    @property
    def plain(self) -> bool:
        """Cross-entropy on the whole model, all of it sent: what the batched engine runs."""
        return self.distillation is None and not self.layout.local and not self.layout.frozen

    def run(self) -> float:
        """Train here; frozen layers stay out of the optimizer, so their delta is exactly 0."""
        params = dict(self.model.named_parameters())
        for name in self.layout.frozen:
            params[name].requires_grad_(False)
        data = self.session.data
        loss = train_sgd(self.model, data.x_train, data.y_train, self.session.settings(),
                         self.generator, self.distillation)  # fmt: skip
        for name in self.layout.frozen:
            params[name].requires_grad_(True)
        return loss

    def reply(self, loss: float) -> Message:
        return Message(self.reply_content(loss), reply_to=self.msg)

    def reply_content(self, loss: float) -> RecordDict:
        """delta = sent - trained (local layers are in neither); keep what the next message
        needs; the answer, top-p compressed if configured."""
        session, server_round = self.session, protocol.read_round(self.msg)
        delta = self.theta - model_to_vector(self.model, self.layout.shared).numpy()
        if self.global_model:
            session.keep_vector(GLOBAL_RECEIVED, self.theta, server_round)
            session.keep_vector(GLOBAL_TRAINED, self.theta - delta, server_round)
            session.save_buffers(self.model, GLOBAL_BUFFERS)
        else:
            session.save_model_state(self.model, self.layout)
        n = len(session.data.y_train)
        return protocol.train_reply(
            delta, n, loss, top_p=session.upload_top_p(), evaluation=self.evaluation
        )


def _teacher(session: Session, msg: Message) -> Distillation | None:
    config = protocol.read_config(msg)
    if not config.get("distill", False):
        return None
    server_round = protocol.read_round(msg)
    source = config["teacher"]
    if source == "regenerated":
        vector = protocol.read_teacher(msg)
    elif source == "round_start":
        vector = session.kept_vector(GLOBAL_RECEIVED, server_round)
    elif source == "phase1_trained":
        vector = session.kept_vector(GLOBAL_TRAINED, server_round)
    else:
        raise ValueError(f"unknown teacher {source!r}")
    teacher = session.model(global_model=True)
    vector_to_model(teacher, vector)
    return Distillation(teacher, float(config["distill-weight"]), float(config["temperature"]))
