"""The ClientApp: report K, train the received vector, evaluate the received vector.

BatchNorm running statistics are not in the vector; they live in `context.state` between
messages, so each client keeps its own, as the authors' persistent client models do.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client_app.node import build_client_model, client_spec, load_client_data
from client_app.training import SGDSettings, evaluate, train_sgd
from common import protocol
from common.config import config_from_run_config
from common.param_vector import model_to_vector, vector_size, vector_to_model
from common.seeding import stable_seed

app = ClientApp()

BUFFERS = "buffers"


def _setup(context: Context):
    cfg = config_from_run_config(context.run_config)
    spec = client_spec(context.node_config, cfg)
    data = load_client_data(spec, cfg.seed)
    model = build_client_model(spec, data).to(torch.device(cfg.client.device))
    if BUFFERS in context.state:
        saved = context.state[BUFFERS].to_torch_state_dict()
        model.load_state_dict(saved, strict=False)
    return cfg, spec, data, model


def _save_buffers(model: torch.nn.Module, context: Context) -> None:
    buffers = {name: Array(b.detach().cpu().numpy()) for name, b in model.named_buffers()}
    if buffers:
        context.state[BUFFERS] = ArrayRecord(buffers)


def _load_theta(model: torch.nn.Module, msg: Message) -> np.ndarray:
    theta = protocol.read_theta(msg)
    vector_to_model(model, theta)
    return theta


@app.query()
def query(msg: Message, context: Context) -> Message:
    _, spec, _, model = _setup(context)
    return Message(protocol.identity_reply(spec.key, vector_size(model)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, spec, data, model = _setup(context)
    theta = _load_theta(model, msg)
    server_round = protocol.read_round(msg)
    generator = torch.Generator().manual_seed(
        stable_seed(cfg.seed, "train", server_round, spec.key)
    )
    settings = SGDSettings(**cfg.client.model_dump(exclude={"device"}))
    loss = train_sgd(model, data.x_train, data.y_train, settings, generator)
    delta = theta - model_to_vector(model).numpy()
    _save_buffers(model, context)
    return Message(protocol.train_reply(delta, len(data.y_train), loss), reply_to=msg)


@app.evaluate()
def evaluate_theta(msg: Message, context: Context) -> Message:
    _, _, data, model = _setup(context)
    _load_theta(model, msg)
    correct, loss_sum = evaluate(model, data.x_test, data.y_test)
    return Message(protocol.evaluate_reply(len(data.y_test), correct, loss_sum), reply_to=msg)
