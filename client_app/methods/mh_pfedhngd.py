"""MH-pFedHNGD's client (paper Algorithm 2): besides MH-pFedHN's round it trains and evaluates
the public global model w_g (`train.global`, `evaluate.global`, phase 1), keeps the vectors
it may later distill from, and in phase 2 distills from the teacher the server names:
(1 - a) CE + a T^2 KL (`client_app/training.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import Message, RecordDict
from torch import nn

from client_app.method import ClientMethod, TrainJob
from client_app.session import Layout, Session
from client_app.training import Objective
from common import protocol
from common.param_vector import model_to_vector, vector_size, vector_to_model


@dataclass(frozen=True)
class Distillation(Objective):
    """MH-pFedHNGD phase 2: learn from the global model's softened predictions too."""

    teacher: nn.Module
    weight: float  # a
    temperature: float  # T

    def setup(self, memory_format: torch.memory_format | None) -> None:
        self.teacher.eval()
        if memory_format is not None:
            self.teacher.to(memory_format=memory_format)

    def __call__(
        self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return distillation_loss(logits, teacher_logits, y, self.weight, self.temperature)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    weight: float,
    temperature: float,
) -> torch.Tensor:
    """(1 - a) CE + a T^2 KL(softmax(t/T) || softmax(s/T)), batch mean (paper eq. 8, with
    a = 1 - lambda).

    Both distributions stay in log space, so extreme logits give finite values.
    """
    ce = F.cross_entropy(student_logits, labels)
    kl = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - weight) * ce + weight * temperature**2 * kl


GLOBAL_BUFFERS = "global-buffers"  # the global model's BatchNorm statistics on this client
GLOBAL_RECEIVED = "global-received"  # the w_g of phase 1 (teacher "round_start")
GLOBAL_TRAINED = "global-trained"  # this client's phase-1-trained copy ("phase1_trained")


def global_model(session: Session) -> nn.Module:
    """The public global model's architecture for this client's data, with its statistics."""
    return session.build_model(session.cfg.method_settings.architecture, (GLOBAL_BUFFERS,))


class GlobalModelClient(ClientMethod):
    reports = (protocol.Count(protocol.GLOBAL_NUM_PARAMS),)
    actions = (protocol.TRAIN_GLOBAL, protocol.EVALUATE_GLOBAL)

    def report(self, session: Session, model: nn.Module) -> dict[str, Any]:
        """K_g: the size of the global model on this client's data (classes, channels)."""
        return {protocol.GLOBAL_NUM_PARAMS: vector_size(global_model(session))}

    def train_job(self, session: Session, msg: Message) -> TrainJob | None:
        if msg.metadata.message_type == protocol.TRAIN_GLOBAL:
            return self.prepare_global(session, msg)
        return super().train_job(session, msg)

    def handle_action(self, session: Session, msg: Message) -> RecordDict:
        if msg.metadata.message_type == protocol.EVALUATE_GLOBAL:
            model = global_model(session)
            theta = protocol.read_theta(msg)
            session.note_received(msg, theta)
            vector_to_model(model, theta)
            return protocol.evaluate_reply(session.evaluate(model))
        return super().handle_action(session, msg)

    # ------------------------------------------------------------ phase 1
    def prepare_global(self, session: Session, msg: Message) -> TrainJob:
        model = global_model(session)
        theta = protocol.read_theta(msg)
        session.note_received(msg, theta)
        vector_to_model(model, theta)
        return TrainJob(
            session,
            msg,
            model,
            session.cfg.method_settings.architecture,
            Layout(None, [], []),
            session.generator("train-global", protocol.read_round(msg)),
            None,
            self.answer_global,
            theta,
            session.evaluate_first(msg, model),
        )

    def answer_global(self, job: TrainJob, loss: float) -> RecordDict:
        """Delta w_g, and the received and trained w_g kept for phase 2's teacher."""
        session, server_round = job.session, protocol.read_round(job.msg)
        delta = job.theta - model_to_vector(job.model).numpy()
        session.keep_vector(GLOBAL_RECEIVED, job.theta, server_round)
        session.keep_vector(GLOBAL_TRAINED, job.theta - delta, server_round)
        session.save_buffers(job.model, GLOBAL_BUFFERS)
        n = len(session.data.y_train)
        top_p = session.upload_top_p()
        return protocol.train_reply(delta, n, loss, top_p=top_p, evaluation=job.evaluation)

    # ------------------------------------------------------------ phase 2
    def objective(self, session: Session, msg: Message, model: nn.Module) -> Distillation | None:
        """Distillation from the teacher the message names, if it asks for it."""
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
        teacher = global_model(session)
        vector_to_model(teacher, vector)
        return Distillation(teacher, float(config["distill-weight"]), float(config["temperature"]))
