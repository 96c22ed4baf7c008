"""The client side of a method, and the one a method gets unless it declares its own.

`ClientMethod` is what MH-pFedHN's clients do: report K, train the vector they receive and
answer with "sent minus trained", evaluate the vector they receive. A method whose clients do
more or otherwise subclasses it in `client_app/methods/<name>.py` and overrides only what
differs; its class declares the fields its replies add (`reports`, `returns`, validated by the
server with `common.protocol`'s declarations), the message types it answers besides query,
train and evaluate (`actions`), and its loss (`objective`). The ClientApp
(`client_app/app.py`) hands every message to the method of the run's configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import Message, RecordDict
from torch import nn

from client_app.session import Layout, Session
from client_app.training import Objective, train_sgd
from common import protocol
from common.param_vector import model_to_vector, vector_size, vector_to_model


@dataclass
class TrainJob:
    """One train message made ready: the model holds what it trains from (with this client's
    BatchNorm statistics and local layers). `run` trains it here; the batched engine
    (`simulation/batched_grid.py`) trains many plain jobs of one architecture at once
    instead. `reply` then answers the message from the trained model, either way."""

    session: Session
    msg: Message
    model: nn.Module
    architecture: str
    layout: Layout
    generator: torch.Generator
    objective: Objective | None
    answer: Callable[[TrainJob, float], RecordDict]  # the method's reply from the trained model
    theta: np.ndarray | None = None  # the received vector, if any
    evaluation: protocol.EvalResult | None = None  # of the model before training, if asked

    @property
    def plain(self) -> bool:
        """Cross-entropy on the whole model, all of it sent: what the batched engine runs."""
        return self.objective is None and not self.layout.local and not self.layout.frozen

    def run(self) -> float:
        """Train here; frozen layers stay out of the optimizer, so their delta is exactly 0."""
        params = dict(self.model.named_parameters())
        for name in self.layout.frozen:
            params[name].requires_grad_(False)
        data = self.session.data
        loss = train_sgd(self.model, data.x_train, data.y_train, self.session.settings(),
                         self.generator, self.objective)  # fmt: skip
        for name in self.layout.frozen:
            params[name].requires_grad_(True)
        return loss

    def reply(self, loss: float) -> Message:
        return Message(self.answer(self, loss), reply_to=self.msg)


class ClientMethod:
    """Trains the vector it receives; answers with sent minus trained (MH-pFedHN, pFedHN)."""

    reports: ClassVar[tuple[protocol.Field, ...]] = ()  # fields its query reply adds
    returns: ClassVar[tuple[protocol.Field, ...]] = ()  # fields its train reply adds
    actions: ClassVar[tuple[str, ...]] = ()  # message types it answers besides the three

    # ----------------------------------------------------------------- dispatch
    def handle(self, session: Session, msg: Message) -> RecordDict:
        """The reply content to any message this method answers."""
        job = self.train_job(session, msg)
        if job is not None:
            return job.answer(job, job.run())
        kind = msg.metadata.message_type
        if kind == protocol.QUERY:
            return self.query(session, msg)
        if kind == protocol.EVALUATE:
            return self.evaluate(session, msg)
        return self.handle_action(session, msg)

    def handle_action(self, session: Session, msg: Message) -> RecordDict:
        """A message type from `actions` (none here)."""
        raise ValueError(f"{type(self).__name__} does not answer {msg.metadata.message_type!r}")

    # -------------------------------------------------------------------- query
    def query(self, session: Session, msg: Message) -> RecordDict:
        """K of the vector part, the role when novel, the secret, and what `report` adds."""
        model = session.model()
        layout = self.layout(session, model)
        return protocol.identity_reply(
            session.spec.key,
            vector_size(model, layout.shared),
            role=session.spec.role,
            proof=session.proof(),
            extras=self.report(session, model),
        )

    def report(self, session: Session, model: nn.Module) -> dict[str, Any]:
        """The values of `reports` (none here)."""
        return {}

    def layout(self, session: Session, model: nn.Module) -> Layout:
        """Which parameters travel in the vector: all trainable ones, less the local layers
        the node config names (`Session.layout`)."""
        return session.layout(model)

    # -------------------------------------------------------------------- train
    def train_job(self, session: Session, msg: Message) -> TrainJob | None:
        """The message's training made ready, if it is one that trains (None otherwise)."""
        if msg.metadata.message_type != protocol.TRAIN:
            return None
        return self.prepare_train(session, msg)

    def prepare_train(self, session: Session, msg: Message) -> TrainJob:
        """The received vector in this client's model, ready to train."""
        model = session.model()
        layout = self.layout(session, model)
        theta = protocol.read_theta(msg)
        session.note_received(msg, theta)
        vector_to_model(model, theta, layout.shared)
        return TrainJob(
            session,
            msg,
            model,
            session.spec.model_name,
            layout,
            session.generator("train", protocol.read_round(msg)),
            self.objective(session, msg, model),
            self.answer_train,
            theta,
            session.evaluate_first(msg, model),
        )

    def objective(self, session: Session, msg: Message, model: nn.Module) -> Objective | None:
        """What the client minimises (None: cross-entropy)."""
        return None

    def answer_train(self, job: TrainJob, loss: float) -> RecordDict:
        """delta = sent - trained (local layers are in neither); keep BatchNorm statistics
        and local layers for the next message; top-p compressed if configured."""
        session = job.session
        delta = job.theta - model_to_vector(job.model, job.layout.shared).numpy()
        session.save_model_state(job.model, job.layout)
        return protocol.train_reply(
            delta,
            len(session.data.y_train),
            loss,
            top_p=session.upload_top_p(),
            evaluation=job.evaluation,
            extras=self.returned(job),
        )

    def returned(self, job: TrainJob) -> dict[str, Any]:
        """The values of `returns` (none here)."""
        return {}

    # ----------------------------------------------------------------- evaluate
    def evaluate(self, session: Session, msg: Message) -> RecordDict:
        """The received vector on this client's test (and validation) split."""
        model = session.model()
        theta = protocol.read_theta(msg)
        session.note_received(msg, theta)
        vector_to_model(model, theta, self.layout(session, model).shared)
        return protocol.evaluate_reply(session.evaluate(model))
