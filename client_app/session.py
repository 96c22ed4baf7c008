"""What a ClientApp message works with: the experiment, this client's spec and data, its
store, and the model it builds (with the BatchNorm statistics and local layers it keeps).

BatchNorm running statistics are not in the vector; they stay on the client between
messages (`client_app/store.py`), so each client keeps its own, as the authors' persistent
client models do; so do the layers a client keeps local (node config `local-layers`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from torch import nn

from client_app.data import ClientData, load_client_data
from client_app.spec import ClientSpec, NodeConfigError, client_spec
from client_app.store import ClientStore
from client_app.training import SGDSettings, evaluate
from common import protocol
from common.config import ExperimentConfig, config_from_run_config
from common.models import build_model
from common.param_vector import matching_parameter_names
from common.seeding import stable_seed

BUFFERS = "buffers"
LOCAL_MODEL = "local-model"  # the Local baseline's own model (parameters and buffers)
LOCAL_LAYERS = "local-layers"  # layers this client never sends (paper C.9)
VECTOR = "vector"
IDENTITY = "identity"  # this client's generated secret


@dataclass(frozen=True)
class Layout:
    """Which parameters travel in the vector, which stay here, which do not train."""

    shared: list[str] | None  # the vector's parameters; None = all trainable ones
    local: list[str]
    frozen: list[str]


def model_layout(
    model: nn.Module, local_layers: Sequence[str] = (), frozen_layers: Sequence[str] = ()
) -> Layout:
    """The layout a client's `local-layers` and `frozen-layers` patterns give its model;
    a selection that matches nothing, or that keeps every parameter home, is refused."""
    local = matching_parameter_names(model, local_layers, "local-layers")
    frozen = matching_parameter_names(model, frozen_layers, "frozen-layers")
    if set(local) & set(frozen):
        raise ValueError(f"layers both local and frozen: {sorted(set(local) & set(frozen))}")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if len(local) == len(trainable):
        raise ValueError("local-layers keep every parameter on the client: nothing to send")
    shared = [n for n in trainable if n not in set(local)] if local else None
    return Layout(shared, local, frozen)


@dataclass(frozen=True)
class Session:
    cfg: ExperimentConfig
    spec: ClientSpec
    data: ClientData
    context: Context
    store: ClientStore

    def model(self) -> nn.Module:
        """This client's model with its saved BatchNorm statistics and local layers."""
        return self.build_model(self.spec.model_name, (BUFFERS, LOCAL_LAYERS))

    def build_model(self, name: str, slots: tuple[str, ...] = ()) -> nn.Module:
        """A model of the zoo for this client's data, with what it keeps in `slots` loaded.

        Built from a seed that depends on the architecture only, so clients of one
        architecture start alike (FedAvg's initial model, the Local baseline's start).
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(self.cfg.seed, "init", name))
            model = build_model(
                name,
                num_classes=self.data.num_classes,
                in_channels=self.data.in_channels,
                image_size=self.spec.data.image_size,
            )
        model = model.to(torch.device(self.cfg.client.device))
        for slot in slots:
            self._load(model, slot)
        return model

    def _load(self, model: nn.Module, slot: str) -> None:
        stored = self.store.get(slot)
        if stored is not None:
            state = {k: torch.from_numpy(np.array(v)) for k, v in stored.items()}
            model.load_state_dict(state, strict=False)

    def layout(self, model: nn.Module) -> Layout:
        return model_layout(model, self.spec.local_layers, self.spec.frozen_layers)

    def save_buffers(self, model: nn.Module, slot: str = BUFFERS) -> None:
        """BatchNorm statistics for the next message (in `slot`: a method may keep several)."""
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

    def evaluate_first(self, msg: Message, model: nn.Module) -> protocol.EvalResult | None:
        """The model as received, on the test split, when the train message asks for it
        (the server's evaluation of the previous round, in the same exchange)."""
        if not protocol.read_config(msg).get(protocol.EVALUATE_FIRST, False):
            return None
        return self.evaluate(model)

    def evaluate(self, model: nn.Module) -> protocol.EvalResult:
        """The model on the test split, and on the validation split when there is one."""
        data = self.data
        validation = None
        layout = self.cfg.client.memory_format
        if len(data.y_val):
            correct, loss_sum = evaluate(model, data.x_val, data.y_val, memory_format=layout)
            validation = protocol.EvalResult(len(data.y_val), correct, loss_sum)
        correct, loss_sum = evaluate(model, data.x_test, data.y_test, memory_format=layout)
        return protocol.EvalResult(len(data.y_test), correct, loss_sum, validation)

    def proof(self) -> str:
        """This client's secret (protocol `client-proof`): node config `client-secret`, or
        one generated once and kept in its store (the state dir, or Flower's context)."""
        configured = self.context.node_config.get("client-secret")
        if configured:
            secret = str(configured)
            if not protocol.MIN_PROOF_LENGTH <= len(secret) <= protocol.MAX_PROOF_LENGTH:
                raise NodeConfigError(
                    f"node config 'client-secret' must have {protocol.MIN_PROOF_LENGTH}-"
                    f"{protocol.MAX_PROOF_LENGTH} characters"
                )
            return secret
        stored = self.store.get(IDENTITY)
        if stored is not None:
            return bytes(stored["secret"]).decode()
        secret = secrets.token_urlsafe(32)
        self.store.put(IDENTITY, {"secret": np.frombuffer(secret.encode(), np.uint8)})
        return secret

    def generator(self, *purpose: object) -> torch.Generator:
        return torch.Generator().manual_seed(stable_seed(self.cfg.seed, *purpose, self.spec.key))


@functools.lru_cache(maxsize=16)
def _experiment(run_config_json: str) -> ExperimentConfig:
    return config_from_run_config(json.loads(run_config_json))


def experiment_of(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The resolved experiment, resolved once per run config and process (not per message)."""
    return _experiment(json.dumps(dict(run_config), sort_keys=True))


def open_session(context: Context) -> Session:
    cfg = experiment_of(context.run_config)
    spec = client_spec(context.node_config, cfg)
    store = ClientStore(context, spec.key, cfg.client.state_dir)
    data = load_client_data(spec, cfg.seed, cfg.client.device)
    return Session(cfg, spec, data, context, store)
