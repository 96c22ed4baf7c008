"""The core of MH-pFedHN on the server: the hypernetwork, per-client embeddings, registry and
optimizer (a `ServerState`, server_app/server_state.py).

Pure PyTorch, no Flower: the Strategy feeds it client keys, parameter counts and deltas.
Invariants (SPEC section 4):
- a client is known by its stable key; its tau embedding vectors are created when it first
  reports K, and a key never changes its K;
- an update for client i touches only the feature extractor, the head of tau_i and v_i;
  every other embedding and head stays bit-identical (their gradients are None, which Adam skips).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.config import ExperimentConfig
from common.seeding import stable_seed
from server_app.hypernetwork import MultiHeadHypernetwork, num_chunks
from server_app.schedules import (
    ONE_BY_ONE,
    PARALLEL_MEAN,
    PARALLEL_RESIDUAL,
    PARALLEL_SEQUENTIAL,
    SCHEDULES,
    client_order,
)
from server_app.server_state import (
    ClientRecord,
    ClientRegistry,
    RegistrationError,
    UpdateRejected,
)

logger = logging.getLogger(__name__)

GLOBAL_KEY = "__global__"  # MH-pFedHNGD's global model; client keys may not start with "__"


@dataclass
class FrozenParts:
    """What no longer trains (generalization to novel clients, paper 4.4): the feature
    extractor, the heads of these taus and the embeddings of these keys."""

    extractor: bool = False
    heads: set[int] = dataclasses.field(default_factory=set)
    keys: set[str] = dataclasses.field(default_factory=set)
    embedding_lr: float | None = None  # Adam lr of embeddings registered after the freeze


@dataclass(frozen=True)
class HypernetworkSettings:
    chunk_size: int = 3072
    embedding_dim: int = 64
    hidden_dim: int = 128
    hidden_layers: int = 3
    embedding_std: float = 1.0
    lr: float = 2e-4
    grad_clip: float = 50.0
    schedule: str = ONE_BY_ONE

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> HypernetworkSettings:
        return cls(**cfg.hypernetwork.model_dump(exclude={"device"}))


def settings_from_dict(values: Mapping) -> HypernetworkSettings:
    """Settings as a checkpoint stored them (older ones named the schedule `update_mode` and
    kept max_params here)."""
    values = dict(values)
    values.pop("max_params", None)
    legacy = values.pop("update_mode", None)
    if legacy is not None:
        values["schedule"] = {"sequential": PARALLEL_SEQUENTIAL, "batched": PARALLEL_MEAN}[legacy]
    return HypernetworkSettings(**values)


def resolve_device(requested: str) -> torch.device:
    """'auto' picks CUDA when present; an unavailable CUDA request falls back to CPU loudly."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("device %r requested but CUDA is not available: using the CPU", requested)
        return torch.device("cpu")
    return device


BYTES_PER_WEIGHT = 16  # a float32 weight, its gradient and Adam's two moments


def memory_budget_bytes(setting: float | str, device: torch.device) -> int:
    """server.memory_budget_gb in bytes; "auto": 90% of the GPU, or half the machine's RAM."""
    if setting != "auto":
        return int(float(setting) * 1e9)
    if device.type == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    return int(0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def fused_adam(device: torch.device) -> bool | None:
    """PyTorch's fused Adam on the devices it has kernels for here, else its default."""
    return True if device.type in ("cpu", "cuda") else None


class HypernetworkServer:
    """Owns everything the server learns; generates vectors and applies client deltas."""

    def __init__(
        self,
        settings: HypernetworkSettings | None = None,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        max_params: int = 50_000_000,
        memory_budget: float | str = "auto",
    ) -> None:
        self.settings = settings or HypernetworkSettings()
        self.registry = ClientRegistry(seed, max_params)
        if self.settings.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.settings.schedule!r}")
        self.seed = seed
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.memory_budget = memory_budget_bytes(memory_budget, self.device)
        s = self.settings
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(seed, "feature_extractor"))
            self.hnet = MultiHeadHypernetwork(
                chunk_size=s.chunk_size,
                embedding_dim=s.embedding_dim,
                hidden_dim=s.hidden_dim,
                hidden_layers=s.hidden_layers,
            ).to(self.device)
        self.embeddings = nn.ParameterDict()
        self.clients: dict[str, ClientRecord] = self.registry.clients
        self.frozen = FrozenParts()
        # fused: one kernel per step instead of ~10 elementwise passes over a head of up to
        # hundreds of millions of weights (6x faster on the CPU, same arithmetic to 1 ulp)
        self.optimizer = torch.optim.Adam(
            self.hnet.feature_extractor.parameters(), lr=s.lr, fused=fused_adam(self.device)
        )

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> HypernetworkServer:
        return cls(
            HypernetworkSettings.from_config(cfg),
            seed=cfg.seed,
            device=cfg.hypernetwork.device,
            max_params=cfg.server.max_params,
            memory_budget=cfg.server.memory_budget_gb,
        )

    # ---------------------------------------------------------------- registry
    def register(self, key: str, num_params: object) -> ClientRecord:
        """Accept a client's K (idempotent for the same K); create its embeddings and head."""
        if not isinstance(key, str) or not key:
            raise RegistrationError(f"client key must be a non-empty string, got {key!r}")
        if key.startswith("__"):
            raise RegistrationError(f"client key {key!r} is reserved (keys may not start with __)")
        return self._register(key, num_params)

    def register_global(self, num_params: object) -> ClientRecord:
        """The global model: its own embeddings, the head of its tau (shared with clients)."""
        return self._register(GLOBAL_KEY, num_params)

    def check(self, *entries: tuple[str, object]) -> list[int]:
        """The Ks that registering these (key, K) pairs would accept, all together within the
        memory budget; raises RegistrationError and changes nothing (so a step that registers
        several keys checks them all first)."""
        ks = [self.registry.check(key, num_params) for key, num_params in entries]
        new_heads: set[int] = set()
        weights = 0
        for (key, _), k in zip(entries, ks, strict=True):
            if key in self.clients:
                continue
            tau = num_chunks(k, self.settings.chunk_size)
            weights += tau * self.settings.embedding_dim
            if not self.hnet.has_head(tau) and tau not in new_heads:
                new_heads.add(tau)
                weights += self.head_weights(tau)
        self.check_budget(weights, ", ".join(f"{key!r} (K={k})" for (key, _), k in
                                             zip(entries, ks, strict=True)))  # fmt: skip
        return ks

    def head_weights(self, tau: int) -> int:
        s = self.settings
        return tau * (s.hidden_dim * s.chunk_size + s.chunk_size)

    def check_budget(self, new_weights: int, what: str) -> None:
        """Refuse, before allocating, what would take the server past its memory budget."""
        in_use = self.num_parameters() * BYTES_PER_WEIGHT
        needed = new_weights * BYTES_PER_WEIGHT
        if in_use + needed > self.memory_budget:
            raise RegistrationError(
                f"registering {what} needs {needed / 1e9:.2f} GB more for the hypernetwork "
                f"(weights, gradients, Adam state); {in_use / 1e9:.2f} GB are in use of a "
                f"budget of {self.memory_budget / 1e9:.2f} GB (raise server.memory_budget_gb)"
            )

    def _register(self, key: str, num_params: object) -> ClientRecord:
        (k,) = self.check((key, num_params))
        if key in self.clients:
            return self.clients[key]
        tau = num_chunks(k, self.settings.chunk_size)
        if not self.hnet.has_head(tau):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(stable_seed(self.seed, "head", tau))
                head = self.hnet.add_head(tau)
            self.optimizer.add_param_group({"params": list(head.parameters())})
        record = ClientRecord(key, k, tau, self._add_embedding(key, tau))
        self.clients[key] = record
        return record

    def _add_embedding(self, key: str, rows: int) -> str:
        """A new client's embedding vectors, seeded by its key, in a parameter group of their
        own (after a freeze, with the novel clients' lr); returns their name."""
        generator = torch.Generator().manual_seed(stable_seed(self.seed, "embedding", key))
        init = torch.randn(rows, self.settings.embedding_dim, generator=generator)
        embedding = nn.Parameter((init * self.settings.embedding_std).to(self.device))
        name = f"client{len(self.clients)}"
        self.embeddings[name] = embedding
        group: dict = {"params": [embedding]}
        if self.frozen.extractor and self.frozen.embedding_lr is not None:
            group["lr"] = self.frozen.embedding_lr
        self.optimizer.add_param_group(group)
        return name

    def record(self, key: str) -> ClientRecord:
        return self.registry.record(key)

    def embedding(self, key: str) -> nn.Parameter:
        return self.embeddings[self.record(key).embedding_name]

    # -------------------------------------------------------------- generation
    def _generate_group(self, keys: Sequence[str]) -> list[torch.Tensor]:
        """Generate clients of one tau with one batched call; returns theta_i per key."""
        stacked = torch.stack([self.embedding(k) for k in keys])
        flat = self.hnet(stacked)
        return [flat[i, : self.record(k).num_params] for i, k in enumerate(keys)]

    def _by_tau(self, keys: Sequence[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for key in keys:
            groups.setdefault(self.record(key).tau, []).append(key)
        return groups

    def generate(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Current theta_i (float32, CPU) for each key, each generated on its own: batched
        matrix kernels round differently with the batch size, and a client's vector must not
        depend on which other clients are generated with it (partial participation, a client
        that drops out, an evaluation riding on a train exchange)."""
        out: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for key in keys:
                (theta,) = self._generate_group([key])
                out[key] = theta.detach().to("cpu", torch.float32).numpy()
        return out

    # ----------------------------------------------------------------- updates
    def freeze(self, embedding_lr: float | None = None) -> None:
        """Freeze everything learned so far: the feature extractor, every head and embedding.

        What is registered afterwards (a novel client's embeddings, with `embedding_lr` if
        given, and the head of a tau never seen before) still trains; frozen parameters get no
        gradient, so Adam leaves them bit-identical.
        """
        self.frozen = FrozenParts(
            extractor=True,
            heads={r.tau for r in self.clients.values()},
            keys=set(self.clients),
            embedding_lr=embedding_lr,
        )

    def _involved_parameters(self, keys: Sequence[str]) -> list[nn.Parameter]:
        frozen = self.frozen
        params = [] if frozen.extractor else list(self.hnet.feature_extractor.parameters())
        for tau in sorted({self.record(k).tau for k in keys} - frozen.heads):
            params += list(self.hnet.head(tau).parameters())
        params += [self.embedding(k) for k in keys if k not in frozen.keys]
        return params

    def gradients(
        self,
        deltas: Mapping[str, torch.Tensor],
        scale: float = 1.0,
        sent: Mapping[str, torch.Tensor] | None = None,
    ) -> dict:
        """scale * sum_i J_i^T delta_i for the parameters that produced the thetas.

        Equals the gradient of scale * sum_i <theta_i(phi), delta_i>; returns {param: grad}.
        With `sent` (the vectors the clients trained from), delta_i becomes the residual
        theta_i(phi) - (sent_i - delta_i) to the client's trained vector: the gradient of
        1/2 ||theta_i(phi) - trained_i||^2, which shrinks as earlier steps move theta_i there.
        """
        keys = list(deltas)
        params = self._involved_parameters(keys)
        if not params:
            return {}
        outputs, grad_outputs = [], []
        for group in self._by_tau(keys).values():
            for key, theta in zip(group, self._generate_group(group), strict=True):
                outputs.append(theta)
                direction = deltas[key].to(self.device, torch.float32)
                if sent is not None:
                    moved = theta.detach() - sent[key].to(self.device, torch.float32)
                    direction = direction + moved
                grad_outputs.append(direction * scale)
        grads = torch.autograd.grad(outputs, params, grad_outputs=grad_outputs, allow_unused=True)
        return {p: g for p, g in zip(params, grads, strict=True) if g is not None}

    def _step(self, grads: dict) -> float:
        """Clip the joint gradient norm, one Adam step; other parameters keep grad None.

        A gradient whose norm is not finite (a delta so large that its VJP overflows) is
        refused before anything changes: clipping would multiply it by 0 and write NaN into
        the shared feature extractor (UpdateRejected; the caller drops that client).
        """
        if not grads:
            return 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for param, grad in grads.items():
            param.grad = grad
        try:
            norm = torch.nn.utils.clip_grad_norm_(
                list(grads), self.settings.grad_clip, error_if_nonfinite=True
            )
        except RuntimeError:
            self.optimizer.zero_grad(set_to_none=True)
            raise UpdateRejected("its update overflows (non-finite gradient norm)") from None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def apply_weighted_delta(
        self, key: str, deltas: Sequence[np.ndarray], weights: Sequence[float]
    ) -> float:
        """One step on sum_i w_i VJP(theta, delta_i) = VJP(theta, sum_i w_i delta_i).

        MH-pFedHNGD's phase 1: every client trained the same w_g, weights are m_i / M.
        """
        if not deltas:
            return 0.0
        combined = sum(
            w * torch.as_tensor(np.asarray(d, np.float32))
            for d, w in zip(deltas, weights, strict=True)
        )
        if not torch.isfinite(combined).all():
            raise UpdateRejected("the weighted sum of the deltas overflows")
        return self._step(self.gradients({key: combined}))

    def step_client(self, key: str, delta: np.ndarray | torch.Tensor) -> float:
        """One clipped Adam step on one client's VJP at the current state (one_by_one);
        raises UpdateRejected, changing nothing, when the step would not be finite."""
        tensors = self._checked({key: delta})
        return self._step(self.gradients(tensors))

    def _checked(self, deltas: Mapping[str, np.ndarray | torch.Tensor]) -> dict:
        # sorted by key: float sums must not depend on the order replies arrived in
        tensors = {
            k: torch.as_tensor(np.asarray(deltas[k], dtype=np.float32)) for k in sorted(deltas)
        }
        for key, delta in tensors.items():
            expected = self.record(key).num_params
            if delta.shape != (expected,):
                raise ValueError(
                    f"delta of {key!r} has shape {tuple(delta.shape)}, expected ({expected},)"
                )
        return tensors

    def apply_deltas(
        self,
        deltas: Mapping[str, np.ndarray | torch.Tensor],
        server_round: int,
        weights: Mapping[str, float] | None = None,
        sent: Mapping[str, np.ndarray] | None = None,
    ) -> dict:
        """Apply a parallel round's deltas (old - new) by the configured schedule.

        `weights` (example counts) are not used: MH-pFedHN updates per client, unweighted.
        `sent`: the vectors the clients trained from (needed by parallel_residual).
        """
        tensors = self._checked(deltas)
        if not tensors:
            return {"updates": 0, "grad_norms": []}
        norms: list[float] = []
        rejected: dict[str, str] = {}
        schedule = self.settings.schedule
        order = client_order(self.seed, list(tensors), server_round)

        def step(key: str, **kwargs) -> None:
            try:
                norms.append(self._step(self.gradients({key: tensors[key]}, **kwargs)))
            except UpdateRejected as err:
                rejected[key] = str(err)

        if schedule == PARALLEL_MEAN:
            norms += self._mean_step(tensors, rejected)
        elif schedule in (PARALLEL_SEQUENTIAL, ONE_BY_ONE):  # one_by_one: given all at once
            for key in order:
                step(key)
        elif schedule == PARALLEL_RESIDUAL:
            if sent is None:
                raise ValueError("parallel_residual needs the vectors the clients trained from")
            for key in order:
                step(key, sent={key: torch.as_tensor(np.asarray(sent[key], np.float32))})
        else:
            raise ValueError(f"unknown schedule {schedule!r}")
        return {"updates": len(norms), "grad_norms": norms, "rejected": rejected}

    def _mean_step(self, tensors: dict, rejected: dict[str, str]) -> list[float]:
        """One step on the mean VJP; if it overflows, the clients whose own VJP overflows
        are dropped (with the reason) and the rest step together."""
        try:
            return [self._step(self.gradients(tensors, scale=1.0 / len(tensors)))]
        except UpdateRejected:
            pass
        for key in list(tensors):
            grads = list(self.gradients({key: tensors[key]}).values())
            if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
                rejected[key] = "its update overflows (non-finite gradient norm)"
        kept = {k: v for k, v in tensors.items() if k not in rejected}
        if not kept:
            return []
        try:
            return [self._step(self.gradients(kept, scale=1.0 / len(kept)))]
        except UpdateRejected as err:  # together they still overflow: nobody steps
            rejected.update(dict.fromkeys(kept, str(err)))
            return []

    # ------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit: weights, Adam state, registry, seed."""
        return {
            "settings": dataclasses.asdict(self.settings),
            "seed": self.seed,
            "max_params": self.registry.max_params,
            "clients": [(r.key, r.num_params) for r in self.clients.values()],
            "hnet": self.hnet.state_dict(),
            "embeddings": self.embeddings.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "frozen": {
                "extractor": self.frozen.extractor,
                "heads": sorted(self.frozen.heads),
                "keys": sorted(self.frozen.keys),
                "embedding_lr": self.frozen.embedding_lr,
            },
        }

    def _restore_structure(self, state: dict) -> None:
        """Anything a subclass must rebuild before registrations are replayed."""

    @classmethod
    def from_state_dict(
        cls, state: dict, device: str | torch.device = "cpu", memory_budget: float | str = "auto"
    ) -> HypernetworkServer:
        """Rebuild by replaying registrations in their original order (same parameter groups),
        then load the tensors and the optimizer state."""
        server = cls(
            settings_from_dict(state["settings"]),
            seed=state["seed"],
            device=device,
            max_params=state.get("max_params", 50_000_000),
            memory_budget=memory_budget,
        )
        server._restore_structure(state)
        for key, num_params in state["clients"]:
            server._register(key, num_params)
        server.hnet.load_state_dict(state["hnet"])
        server.embeddings.load_state_dict(state["embeddings"])
        server.optimizer.load_state_dict(state["optimizer"])
        frozen = state.get("frozen") or {}
        server.frozen = FrozenParts(
            extractor=bool(frozen.get("extractor", False)),
            heads=set(frozen.get("heads", ())),
            keys=set(frozen.get("keys", ())),
            embedding_lr=frozen.get("embedding_lr"),
        )
        return server

    # ------------------------------------------------------------------ sizes
    def num_parameters(self) -> int:
        """Trainable scalars on the server (feature extractor, heads, embeddings)."""
        total = sum(p.numel() for p in self.hnet.parameters())
        return total + sum(p.numel() for p in self.embeddings.values())

    def describe(self) -> str:
        taus = sorted({r.tau for r in self.clients.values()})
        clients = len(self.clients) - (GLOBAL_KEY in self.clients)
        extra = " and the global model" if GLOBAL_KEY in self.clients else ""
        return (
            f"{clients} clients{extra}, {len(taus)} heads (tau {taus}), "
            f"{self.num_parameters() / 1e6:.1f}M parameters on {self.device}"
        )
