"""PeFLL (Scott, Zakerinia and Lampert, ICLR 2024; code pefllauthors/PeFLL;
docs/design/baselines.md, section 4): an embedding network E turns a client's data into a
descriptor v_i (computed by the client, client_app/methods/pefll.py), and a hypernetwork h,
which never leaves the server, turns the standardised descriptor into the client's model,
theta_i = h((v_i - m) / s). Both learn from the clients' updates: per round

1. the sampled clients compute their descriptors (`train.descriptor`, E sent along);
2. they train theta_i (`train`) and return delta_i;
3. the server takes g_h,i = J_h^T delta_i and g_v,i = d<theta_i, delta_i>/dv_i, and each
   client returns E's part of the chain rule, (dv_i/dE)^T g_v,i (`train.embedgrad`);
4. one Adam step on the mean over clients of (g_h, g_E), the joint norm clipped.

m and s (scalars) come from the first descriptor of the run and stay fixed. Evaluation uses
each client's descriptor of all its training data. A new client gets a model without any
training: one descriptor exchange. Homogeneous models only (one set of per-tensor heads).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Self

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from client_app.methods.pefll import (
    DATA_SHAPE,
    DESCRIPTOR,
    DESCRIPTOR_GRAD,
    EMBED_BATCHES,
    EMBED_GRAD,
    EMBED_NET,
    MAX_DESCRIPTOR,
    SCOPE,
    TRAIN_DESCRIPTOR,
    TRAIN_EMBEDGRAD,
    DescriptorNet,
)
from common import protocol
from common.config import ExperimentConfig
from common.param_vector import model_to_vector
from common.seeding import stable_seed
from server_app.memory import fused_adam
from server_app.methods.pfedhn import PerTensorHeads
from server_app.round_loop import Exchanged, RoundLoop, RoundOutcome, from_metrics, reject
from server_app.server_state import ClientRecord, ClientRegistry, RegistrationError


class PeFLLSettings(BaseModel):
    """PeFLL's networks and their training (defaults of its code, train.py)."""

    model_config = ConfigDict(extra="forbid")

    descriptor_dim: int = Field(
        0, ge=0, le=MAX_DESCRIPTOR, description="d; 0: 1 + N/4 for N clients, as the code"
    )
    hidden_dim: int = Field(100, gt=0, description="the hypernetwork's width")
    hidden_layers: int = Field(3, gt=0, description="hidden Linear layers after the first")
    embed_batches: int = Field(1, gt=0, description="batches a training descriptor averages")
    lr: float = Field(2e-4, gt=0, description="Adam learning rate of E and h together")
    grad_clip: float = Field(50.0, gt=0, description="joint gradient norm bound of a step")


class DescriptorHypernetwork(nn.Module):
    """h: Linear(d, hidden), then hidden_layers x [ReLU, Linear(hidden, hidden)], then one
    Linear(hidden, numel) head per parameter tensor."""

    def __init__(self, dim: int, settings: PeFLLSettings, sizes: Sequence[int]) -> None:
        super().__init__()
        h = settings.hidden_dim
        layers: list[nn.Module] = [nn.Linear(dim, h)]
        for _ in range(settings.hidden_layers):
            layers += [nn.ReLU(), nn.Linear(h, h)]
        self.body = nn.Sequential(*layers)
        self.heads = PerTensorHeads(h, sizes)

    def forward(self, descriptor: torch.Tensor) -> torch.Tensor:
        return self.heads(self.body(descriptor))


class PeFLLServer(ClientRegistry):
    def __init__(self, seed: int, max_params: int, settings: PeFLLSettings | None = None,
                 clients: int = 10) -> None:  # fmt: skip
        super().__init__(seed, max_params)
        self.settings = settings or PeFLLSettings()
        self.dim = self.settings.descriptor_dim or 1 + clients // 4
        self.sizes: tuple[int, ...] | None = None
        self.shape: tuple[int, int, int] | None = None  # in-channels, classes, image size
        self.embed: DescriptorNet | None = None
        self.hnet: DescriptorHypernetwork | None = None
        self.optimizer: torch.optim.Adam | None = None
        self.scale: tuple[float, float] | None = None  # m and s, from the first descriptor
        self.descriptors: dict[str, np.ndarray] = {}  # the latest raw descriptor of each

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Self:
        clients = 10 if cfg.data.num_clients == "auto" else int(cfg.data.num_clients)
        return cls(cfg.seed, cfg.server.max_params, cfg.method_settings, clients)

    def register_client(
        self, key: str, num_params: object, sizes: Sequence[int], shape: tuple[int, int, int]
    ) -> ClientRecord:
        """The first client fixes the architecture and the data's shape (E and h are then
        made, seeded); later ones must match."""
        k = self.check(key, num_params)
        signature = tuple(int(n) for n in sizes)
        if sum(signature) != k:
            raise RegistrationError(f"K={k} does not match the tensor sizes reported")
        if self.sizes is not None and (signature, shape) != (self.sizes, self.shape):
            raise RegistrationError("PeFLL serves one architecture on one kind of data: this "
                                    "client's tensor sizes or data shape differ")  # fmt: skip
        if self.sizes is None:
            self.build(signature, shape)
        return self.register(key, k)

    def build(self, sizes: tuple[int, ...], shape: tuple[int, int, int]) -> None:
        self.sizes, self.shape = sizes, shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(self.seed, "pefll"))
            self.embed = DescriptorNet(*shape, self.dim)
            self.hnet = DescriptorHypernetwork(self.dim, self.settings, sizes)
        params = [*self.embed.parameters(), *self.hnet.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=self.settings.lr,
                                          fused=fused_adam(torch.device("cpu")))  # fmt: skip

    def embed_vector(self) -> np.ndarray:
        return model_to_vector(self.embed).numpy()

    def standardised(self, raw: torch.Tensor) -> torch.Tensor:
        m, s = self.scale
        return (raw - m) / s

    def note_descriptors(self, descriptors: Mapping[str, np.ndarray]) -> None:
        """Keep each client's latest descriptor; the first ever fixes m and s."""
        for key in sorted(descriptors):
            if self.scale is None:
                first = descriptors[key].astype(np.float64)
                self.scale = (float(first.mean()), float(first.std()) or 1.0)
            self.descriptors[key] = np.asarray(descriptors[key], np.float32)

    def generate(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {k: self.hnet(self.standardised(torch.from_numpy(self.descriptors[k])))
                    .numpy() for k in keys}  # fmt: skip

    def gradients(self, key: str, delta: np.ndarray) -> tuple[list[torch.Tensor], np.ndarray]:
        """(g_h: d<theta, delta>/dh per parameter, g_v: d<theta, delta>/dv at the raw
        descriptor), theta = h((v - m) / s)."""
        v = torch.from_numpy(self.descriptors[key]).requires_grad_(True)
        inner = (self.hnet(self.standardised(v)) * torch.from_numpy(delta)).sum()
        grads = torch.autograd.grad(inner, [v, *self.hnet.parameters()])
        return list(grads[1:]), grads[0].numpy().astype(np.float32)

    def step(
        self, h_grads: Sequence[Sequence[torch.Tensor]], e_grads: Sequence[np.ndarray]
    ) -> None:
        """One Adam step on the mean over clients of (g_h, g_E), the joint norm clipped."""
        if not h_grads:
            return
        params = [*self.embed.parameters(), *self.hnet.parameters()]
        self.optimizer.zero_grad()
        e_mean = torch.from_numpy(np.mean(np.stack(e_grads), axis=0))
        offset = 0
        for p in self.embed.parameters():
            p.grad = e_mean[offset : offset + p.numel()].reshape(p.shape).clone()
            offset += p.numel()
        for i, p in enumerate(self.hnet.parameters()):
            p.grad = sum(g[i] for g in h_grads) / len(h_grads)
        torch.nn.utils.clip_grad_norm_(params, self.settings.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad()

    def describe(self) -> str:
        return (f"{len(self.clients)} clients, descriptors of {self.dim} numbers, one "
                f"hypernetwork and one embedding network")  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        built = self.embed is not None
        return {**self.registry_state(), "settings": self.settings.model_dump(), "dim": self.dim,
                "sizes": list(self.sizes or ()), "shape": list(self.shape or ()),
                "scale": self.scale,
                "descriptors": {k: torch.from_numpy(v) for k, v in self.descriptors.items()},
                "embed": self.embed.state_dict() if built else None,
                "hnet": self.hnet.state_dict() if built else None,
                "optimizer": self.optimizer.state_dict() if built else None}  # fmt: skip

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str = "cpu", **_: Any) -> Self:
        server = cls(state["seed"], state["max_params"], PeFLLSettings(**state["settings"]))
        server.dim = state["dim"]
        if state["embed"] is not None:
            server.build(tuple(state["sizes"]), tuple(state["shape"]))
            server.embed.load_state_dict(state["embed"])
            server.hnet.load_state_dict(state["hnet"])
            server.optimizer.load_state_dict(state["optimizer"])
        server.restore_registry(state)
        server.scale = None if state["scale"] is None else tuple(state["scale"])
        descriptors = state["descriptors"].items()
        server.descriptors = {k: np.asarray(v, np.float32) for k, v in descriptors}
        return server


class PeFLL(RoundLoop):
    state: PeFLLServer
    state_class = PeFLLServer

    def register(self, identity: protocol.Identity) -> ClientRecord:
        shape = tuple(int(identity.extras[n]) for n in DATA_SHAPE)
        sizes = identity.extras[protocol.TENSOR_SIZES]
        return self.state.register_client(identity.client_key, identity.num_params, sizes, shape)

    def federation_value(self, identity: protocol.Identity) -> Any:
        sizes = tuple(identity.extras.get(protocol.TENSOR_SIZES) or ())
        return sizes, tuple(identity.extras.get(n) for n in DATA_SHAPE)

    def fuses_evaluation(self, server_round: int, num_rounds: int) -> bool:
        return False  # an evaluation's model comes from the full-data descriptor

    def exchange_extra(
        self, grid: Grid, server_round: int, keys: Sequence[str], kind: str, timeout: float,
        config: Mapping[str, Any], arrays: Mapping[str, Mapping[str, np.ndarray]],
        field: protocol.Floats,
    ) -> tuple[dict[str, np.ndarray], Exchanged]:  # fmt: skip
        """One of PeFLL's own exchanges: E (and per-client arrays) out, one field back."""
        full = {**config, "descriptor-dim": self.state.dim}
        messages = [Message(protocol.instruction(None, server_round, full,
                                                 extras={EMBED_NET: self.state.embed_vector(),
                                                         **arrays.get(k, {})}),
                            dst_node_id=self.directory.node_of[k], message_type=kind)
                    for k in keys]  # fmt: skip
        exchanged = self.exchange(grid, messages, timeout, f" ({kind})")
        parsed = self.parse_all(server_round, exchanged.replies.values(),
                                lambda key, r: protocol.parse_fields_reply(r, [field])[field.name],
                                f" ({kind})")  # fmt: skip
        return parsed, exchanged

    def descriptors(
        self, grid: Grid, server_round: int, keys: Sequence[str], scope: str, timeout: float
    ) -> tuple[list[str], Exchanged]:
        """The clients' descriptors (kept on the server state); which clients sent one."""
        config = {SCOPE: scope, EMBED_BATCHES: self.state.settings.embed_batches}
        field = protocol.Floats(DESCRIPTOR, max_size=MAX_DESCRIPTOR, shape=(self.state.dim,))
        got, exchanged = self.exchange_extra(grid, server_round, keys, TRAIN_DESCRIPTOR,
                                             timeout, config, {}, field)  # fmt: skip
        self.state.note_descriptors(got)
        return sorted(got), exchanged

    def train_round(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
        timeout: float, evaluate_previous: bool,
    ) -> RoundOutcome:  # fmt: skip
        """Descriptors, training, the embedding gradients, one step."""
        keys = self.sample(server_round, self.eligible(server_round, self.connected_clients(grid)))
        outcome = RoundOutcome()
        ready, described = self.descriptors(grid, server_round, keys, "batches", timeout)
        outcome.exchanges.append(described)
        train = list(self.configure_train(server_round, arrays, config, self.view(grid, ready)))
        exchanged = self.exchange(grid, train, timeout)
        outcome.exchanges.append(exchanged)
        results = self.parse_all(server_round, exchanged.replies.values(), self.parse_train)
        bounded = {k: self.bounded(server_round, k, results[k]) for k in sorted(results)}
        results = {k: result for k, (result, _) in bounded.items()}
        started = time.perf_counter()  # the server's work: these gradients and the step
        grads = {k: self.state.gradients(k, results[k].delta) for k in sorted(results)}
        server_s = time.perf_counter() - started
        field = protocol.Floats(EMBED_GRAD, max_size=protocol.MAX_VECTOR,
                                max_abs=self.cfg.server.max_delta_abs,
                                shape=(self.state.embed_vector().size,))  # fmt: skip
        config_e = {SCOPE: "batches", EMBED_BATCHES: self.state.settings.embed_batches}
        per_client = {k: {DESCRIPTOR_GRAD: g_v} for k, (_, g_v) in grads.items()}
        e_grads, exchanged = self.exchange_extra(grid, server_round, sorted(grads),
                                                 TRAIN_EMBEDGRAD, timeout, config_e, per_client,
                                                 field)  # fmt: skip
        outcome.exchanges.append(exchanged)
        done = sorted(e_grads)
        for key in set(results) - set(done):
            reject(server_round, key, "no embedding gradient: its update is left out")
        started = time.perf_counter()
        self.state.step([grads[k][0] for k in done], [e_grads[k] for k in done])
        server_s += time.perf_counter() - started
        applied = {k: results[k] for k in done}
        outcome.metrics = {**self.train_metrics(applied, server_s),
                           "bytes_up": sum(r.bytes_up for r in results.values())}  # fmt: skip
        if scaled := sum(was_scaled for _, was_scaled in bounded.values()):
            outcome.metrics["deltas_scaled"] = scaled
        outcome.metrics = self.combine([outcome.metrics])
        return outcome

    def evaluate_round(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
        timeout: float,
    ) -> tuple[dict[str, Any], list[Exchanged]]:  # fmt: skip
        """Each client's model from the descriptor of all its training data, evaluated."""
        keys = self.connected_clients(grid)
        ready, described = self.descriptors(grid, server_round, keys, "full", timeout)
        messages = self.configure_evaluate(server_round, arrays, config, self.view(grid, ready))
        exchanged = self.exchange(grid, messages, timeout)
        metrics = self.aggregate_evaluate(server_round, exchanged.replies.values())
        return from_metrics(metrics), [described, exchanged]
