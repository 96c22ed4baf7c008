"""The ClientApp: report K, train the received vector, evaluate the received vector.

BatchNorm running statistics are not in the vector; they stay on the client between
messages (`client_app/store.py`), so each client keeps its own, as the authors' persistent
client models do; so do the layers a client keeps local (node config `local-layers`).
For MH-pFedHNG(D) the client also trains and evaluates the public global model
(`train.global`, `evaluate.global`) and keeps the phase-1 vectors it may distill from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from torch import nn

from client_app.node import ClientData, ClientSpec, client_spec, load_client_data
from client_app.store import ClientStore
from client_app.training import Distillation, SGDSettings, evaluate, train_sgd
from common import protocol
from common.config import ExperimentConfig, config_from_run_config
from common.models import build_model
from common.param_vector import (
    matching_parameter_names,
    model_to_vector,
    vector_size,
    vector_to_model,
)
from common.seeding import stable_seed

app = ClientApp()

BUFFERS = "buffers"
GLOBAL_BUFFERS = "global-buffers"
GLOBAL_RECEIVED = "global-received"  # the w_g of phase 1 (teacher "round_start")
GLOBAL_TRAINED = "global-trained"  # this client's phase-1-trained copy ("phase1_trained")
LOCAL_MODEL = "local-model"  # the Local baseline's own model (parameters and buffers)
LOCAL_LAYERS = "local-layers"  # layers this client never sends (paper C.9)
VECTOR = "vector"


@dataclass(frozen=True)
class Layout:
    """Which parameters travel in the vector, which stay here, which do not train."""

    shared: list[str] | None  # the vector's parameters; None = all trainable ones
    local: list[str]
    frozen: list[str]


@dataclass(frozen=True)
class Session:
    cfg: ExperimentConfig
    spec: ClientSpec
    data: ClientData
    context: Context
    store: ClientStore

    def model(self, global_model: bool = False) -> nn.Module:
        """This client's model (or the global one) with its saved BatchNorm statistics
        (and, for its own model, the local layers it keeps).

        Built from a seed that depends on the architecture only, so clients of one
        architecture start alike (FedAvg's initial model, the Local baseline's start).
        """
        name = self.cfg.global_model.architecture if global_model else self.spec.model_name
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(self.cfg.seed, "init", name))
            model = build_model(
                name,
                num_classes=self.data.num_classes,
                in_channels=self.data.in_channels,
                image_size=self.spec.data.image_size,
            )
        model = model.to(torch.device(self.cfg.client.device))
        for slot in (GLOBAL_BUFFERS,) if global_model else (BUFFERS, LOCAL_LAYERS):
            self._load(model, slot)
        return model

    def _load(self, model: nn.Module, slot: str) -> None:
        stored = self.store.get(slot)
        if stored is not None:
            state = {k: torch.from_numpy(np.array(v)) for k, v in stored.items()}
            model.load_state_dict(state, strict=False)

    def layout(self, model: nn.Module) -> Layout:
        local = matching_parameter_names(model, self.spec.local_layers, "local-layers")
        frozen = matching_parameter_names(model, self.spec.frozen_layers, "frozen-layers")
        if set(local) & set(frozen):
            raise ValueError(f"layers both local and frozen: {sorted(set(local) & set(frozen))}")
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if len(local) == len(trainable):
            raise ValueError("local-layers keep every parameter on the client: nothing to send")
        shared = [n for n in trainable if n not in set(local)] if local else None
        return Layout(shared, local, frozen)

    def save_buffers(self, model: nn.Module, slot: str = BUFFERS) -> None:
        """BatchNorm statistics for the next message (GLOBAL_BUFFERS: the global model's)."""
        buffers = {name: b.detach().cpu().numpy() for name, b in model.named_buffers()}
        if buffers:
            self.store.put(slot, buffers)

    def save_model_state(self, model: nn.Module, layout: Layout | None = None) -> None:
        """BatchNorm statistics (and local layers) for the next message."""
        self.save_buffers(model)
        if layout is not None and layout.local:
            params = dict(model.named_parameters())
            local = {n: params[n].detach().cpu().numpy() for n in layout.local}
            self.store.put(LOCAL_LAYERS, local)

    def keep_vector(self, slot: str, vector: np.ndarray, server_round: int) -> None:
        self.context.state[slot] = ArrayRecord({VECTOR: Array(np.asarray(vector, np.float32))})
        self.context.state[slot + "-round"] = ConfigRecord({"round": server_round})

    def kept_vector(self, slot: str, server_round: int) -> np.ndarray:
        if slot not in self.context.state:
            raise RuntimeError(f"no {slot} vector kept: this client skipped phase 1")
        kept_round = int(self.context.state[slot + "-round"]["round"])
        if kept_round != server_round:
            raise RuntimeError(f"{slot} vector is from round {kept_round}, not {server_round}")
        return self.context.state[slot][VECTOR].numpy()

    def local_model(self) -> nn.Module:
        """The Local baseline's model, as this client last left it."""
        model = self.model()
        self._load(model, LOCAL_MODEL)
        return model

    def save_local_model(self, model: nn.Module) -> None:
        state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        self.store.put(LOCAL_MODEL, state)

    def note_received(self, msg: Message, vector: np.ndarray) -> None:
        """Append what arrived to the node config's `message-log` file, if one is set.

        An audit trail for operators: round, message type and SHA-256 of each vector.
        """
        path = self.context.node_config.get("message-log")
        if not path:
            return
        entry = {
            "client_key": self.spec.key,
            "round": protocol.read_round(msg),
            "type": msg.metadata.message_type,
            "num_params": int(vector.size),
            "sha256": hashlib.sha256(np.ascontiguousarray(vector).tobytes()).hexdigest(),
        }
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def settings(self) -> SGDSettings:
        return SGDSettings.from_config(self.cfg.client)

    def upload_top_p(self) -> float | None:
        return self.cfg.client.upload_top_p if self.cfg.client.upload == "top_p" else None

    def generator(self, *purpose: object) -> torch.Generator:
        return torch.Generator().manual_seed(stable_seed(self.cfg.seed, *purpose, self.spec.key))


def open_session(context: Context) -> Session:
    cfg = config_from_run_config(context.run_config)
    spec = client_spec(context.node_config, cfg)
    store = ClientStore(context, spec.key)
    data = load_client_data(spec, cfg.seed, cfg.client.device)
    return Session(cfg, spec, data, context, store)


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
        return cls(session, msg, model, theta, layout, generator, distillation, global_model)

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
        """delta = sent - trained (local layers are in neither); keep what the next message
        needs; answer, top-p compressed if configured."""
        session, server_round = self.session, protocol.read_round(self.msg)
        delta = self.theta - model_to_vector(self.model, self.layout.shared).numpy()
        if self.global_model:
            session.keep_vector(GLOBAL_RECEIVED, self.theta, server_round)
            session.keep_vector(GLOBAL_TRAINED, self.theta - delta, server_round)
            session.save_buffers(self.model, GLOBAL_BUFFERS)
        else:
            session.save_model_state(self.model, self.layout)
        n = len(session.data.y_train)
        reply = protocol.train_reply(delta, n, loss, top_p=session.upload_top_p())
        return Message(reply, reply_to=self.msg)


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


@app.query()
def query(msg: Message, context: Context) -> Message:
    """K of the vector part (and what the chosen method needs besides: K_g, tensor sizes,
    initial vector), and the role when novel."""
    session = open_session(context)
    model = session.model()
    layout = session.layout(model)
    method = session.cfg.method
    global_size = None
    if session.cfg.uses_global_model:
        global_size = vector_size(session.model(global_model=True))
    sizes = None
    if method == "pfedhn":
        sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    initial = model_to_vector(model).numpy() if method == "fedavg" else None
    reply = protocol.identity_reply(
        session.spec.key,
        vector_size(model, layout.shared),
        global_size,
        sizes,
        initial,
        role=session.spec.role,
    )
    return Message(reply, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    session = open_session(context)
    if "arrays" not in msg.content:  # Local baseline: train this client's own model
        model = session.local_model()
        data = session.data
        generator = session.generator("train", protocol.read_round(msg))
        loss = train_sgd(model, data.x_train, data.y_train, session.settings(), generator)
        session.save_local_model(model)
        return Message(protocol.train_reply(None, len(data.y_train), loss), reply_to=msg)
    job = TrainJob.prepare(session, msg, global_model=False)
    return job.reply(job.run())


@app.train("global")
def train_global(msg: Message, context: Context) -> Message:
    job = TrainJob.prepare(open_session(context), msg, global_model=True)
    return job.reply(job.run())


def _evaluate(msg: Message, context: Context, global_model: bool) -> Message:
    session = open_session(context)
    if "arrays" not in msg.content:  # Local baseline: this client's own model
        model = session.local_model()
    else:
        model = session.model(global_model)
        layout = None if global_model else session.layout(model)
        theta = protocol.read_theta(msg)
        session.note_received(msg, theta)
        vector_to_model(model, theta, None if layout is None else layout.shared)
    correct, loss_sum = evaluate(model, session.data.x_test, session.data.y_test)
    reply = protocol.evaluate_reply(len(session.data.y_test), correct, loss_sum)
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate_theta(msg: Message, context: Context) -> Message:
    return _evaluate(msg, context, global_model=False)


@app.evaluate("global")
def evaluate_global(msg: Message, context: Context) -> Message:
    return _evaluate(msg, context, global_model=True)
