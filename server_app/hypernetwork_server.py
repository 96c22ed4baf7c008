"""What the hypernetwork methods learn on the server, and how it generates client vectors
(docs/concepts/hypernetwork.md): the feature extractor, one head per head family, each
client's embedding vectors, the client registry and the Adam optimizer over all of them.

Pure PyTorch, no Flower. How client deltas become steps is `server_app/hypernetwork_steps.py`,
how the state is saved and rebuilt `server_app/hypernetwork_persistence.py`.
Invariants:
- a client is known by its stable key; its embedding vectors are created when it first
  reports K, and a key never changes its K;
- an update for client i touches only the feature extractor, its head and its embeddings;
  every other embedding and head stays bit-identical (their gradients are None, which Adam
  skips).

MH-pFedHN's heads are chunk heads, one per chunk count tau = ceil(K / N), shared by every
client of that tau; a subclass (pFedHN) makes other heads by overriding the head hooks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.config import DEFAULT_MAX_PARAMS, ExperimentConfig
from common.param_vector import num_chunks
from common.seeding import stable_seed
from server_app.generated_from import GeneratedFrom
from server_app.hypernetwork import ChunkHead, MultiHeadHypernetwork
from server_app.memory import BYTES_PER_WEIGHT, fused_adam, memory_budget_bytes, resolve_device
from server_app.server_state import ClientRecord, ClientRegistry, RegistrationError


@dataclass(frozen=True)
class EmbeddedClient(ClientRecord):
    """A registered client of a hypernetwork: its embedding vectors and the head it uses."""

    tau: int = 1  # embedding vectors (chunks for MH-pFedHN, 1 for pFedHN)
    embedding_name: str = ""  # its entry in `embeddings`
    head: str = ""  # its head in `hnet.heads`


@dataclass
class FrozenParts:
    """What no longer trains (generalization to novel clients, paper 4.4): the feature
    extractor, these heads and the embeddings of these keys."""

    extractor: bool = False
    heads: set[str] = dataclasses.field(default_factory=set)
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
    schedule: str = "one_by_one"

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> HypernetworkSettings:
        return cls(**cfg.hypernetwork.model_dump(exclude={"device", "in_flight", "vjp_at"}))


class HypernetworkServer:
    """Owns everything the server learns; registers clients and generates their vectors."""

    def __init__(
        self,
        settings: HypernetworkSettings | None = None,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        max_params: int = DEFAULT_MAX_PARAMS,
        memory_budget: float | str = "auto",
        client_memory: float | str = "auto",
    ) -> None:
        self.settings = settings or HypernetworkSettings()
        self.registry = ClientRegistry(seed, max_params)
        self.seed = seed
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.memory_budget = memory_budget_bytes(memory_budget, self.device)
        self.client_quota = (self.memory_budget // 4 if client_memory == "auto"
                             else int(float(client_memory) * 1e9))  # fmt: skip
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
        self.clients: dict[str, EmbeddedClient] = self.registry.clients  # type: ignore[assignment]
        self.registered: list[EmbeddedClient] = []  # every embedding owner, in order
        self.frozen = FrozenParts()
        self.generated_from = GeneratedFrom()  # what in-flight vectors came from (vjp_at)
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
            client_memory=cfg.server.client_memory_gb,
        )

    # ------------------------------------------------------------- head hooks
    def use_feature_extractor(self, module: nn.Module) -> None:
        """Put another shared map from embeddings to features in place of MH-pFedHN's MLP
        (a subclass, right after construction: before any client registers)."""
        if self.registered:
            raise RuntimeError("the feature extractor is replaced before any registration")
        self.hnet.feature_extractor = module.to(self.device)
        self.optimizer = torch.optim.Adam(module.parameters(), lr=self.settings.lr,
                                          fused=fused_adam(self.device))  # fmt: skip

    def rows_for(self, key: str, num_params: int) -> int:
        """Embedding vectors of a client of K parameters: tau = ceil(K / N) chunks."""
        return num_chunks(num_params, self.settings.chunk_size)

    def head_for(self, key: str, num_params: int) -> str:
        """The head that generates this client: the chunk head of its tau."""
        return MultiHeadHypernetwork.head_name(self.rows_for(key, num_params))

    def head_weights(self, key: str, num_params: int) -> int:
        s = self.settings
        return self.rows_for(key, num_params) * (s.hidden_dim * s.chunk_size + s.chunk_size)

    def make_head(self, key: str, num_params: int) -> nn.Module:
        """A new head, seeded by what it is for (so its weights do not depend on arrival)."""
        tau = self.rows_for(key, num_params)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(self.seed, "head", tau))
            return ChunkHead(tau, self.settings.hidden_dim, self.settings.chunk_size)

    def apply_heads(
        self, records: Sequence[EmbeddedClient], features: torch.Tensor
    ) -> list[torch.Tensor]:
        """theta_i of clients sharing one head, from their (n, tau, hidden) features."""
        flat = self.hnet.heads[records[0].head](features).flatten(-2)
        return [flat[i, : r.num_params] for i, r in enumerate(records)]

    def head_order(self, heads: set[str]) -> list[str]:
        """Heads in the order their parameters are stepped (by tau)."""
        return sorted(heads, key=lambda name: int(name.removeprefix("tau")))

    # --------------------------------------------------------------- registry
    def register(self, key: str, num_params: object) -> EmbeddedClient:
        """Accept a client's K (idempotent for the same K); create its embeddings and head."""
        if not isinstance(key, str) or not key:
            raise RegistrationError(f"client key must be a non-empty string, got {key!r}")
        if key.startswith("__"):
            raise RegistrationError(f"client key {key!r} is reserved (keys may not start with __)")
        (k,) = self.check((key, num_params))
        if key in self.clients:
            return self.clients[key]
        record = self.add(key, k)
        self.clients[key] = record
        return record

    def check(self, *entries: tuple[str, object]) -> list[int]:
        """The Ks that registering these (key, K) pairs would accept, all together within the
        memory budget; raises RegistrationError and changes nothing (so a step that registers
        several keys checks them all first)."""
        ks = [self.registry.check(key, num_params) for key, num_params in entries]
        new_heads: set[str] = set()
        weights = 0
        for (key, _), k in zip(entries, ks, strict=True):
            if key in self.clients:
                continue
            own = self.rows_for(key, k) * self.settings.embedding_dim
            head = self.head_for(key, k)
            if head not in self.hnet.heads and head not in new_heads:
                new_heads.add(head)
                own += self.head_weights(key, k)
            if own * BYTES_PER_WEIGHT > self.client_quota:
                raise RegistrationError(
                    f"registering {key!r} (K={k}) needs {own * BYTES_PER_WEIGHT / 1e9:.2f} GB "
                    f"for the hypernetwork, more than one client may take "
                    f"({self.client_quota / 1e9:.2f} GB: server.client_memory_gb)"
                )
            weights += own
        what = ", ".join(f"{key!r} (K={k})" for (key, _), k in zip(entries, ks, strict=True))
        self.check_budget(weights, what)
        return ks

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

    def add(self, key: str, num_params: int) -> EmbeddedClient:
        """Create what a checked registration needs: its head (if new), then its embedding
        vectors, each in a parameter group of its own, in the order registrations came (a
        checkpoint replays them so the optimizer's groups come back in the same order)."""
        head = self.head_for(key, num_params)
        if head not in self.hnet.heads:
            module = self.make_head(key, num_params).to(self.device)
            self.hnet.heads[head] = module
            self.optimizer.add_param_group({"params": list(module.parameters())})
        tau = self.rows_for(key, num_params)
        record = EmbeddedClient(key, num_params, tau, self._add_embedding(key, tau), head)
        self.registered.append(record)
        return record

    def _add_embedding(self, key: str, rows: int) -> str:
        """A new owner's embedding vectors, seeded by its key, in a parameter group of their
        own (after a freeze, with the novel clients' lr); returns their name."""
        generator = torch.Generator().manual_seed(stable_seed(self.seed, "embedding", key))
        init = torch.randn(rows, self.settings.embedding_dim, generator=generator)
        embedding = nn.Parameter((init * self.settings.embedding_std).to(self.device))
        name = f"client{len(self.embeddings)}"
        self.embeddings[name] = embedding
        group: dict = {"params": [embedding]}
        if self.frozen.extractor and self.frozen.embedding_lr is not None:
            group["lr"] = self.frozen.embedding_lr
        self.optimizer.add_param_group(group)
        return name

    def record(self, key: str) -> EmbeddedClient:
        return self.registry.record(key)  # type: ignore[return-value]

    def embedding(self, record: EmbeddedClient | str) -> nn.Parameter:
        if isinstance(record, str):
            record = self.record(record)
        return self.embeddings[record.embedding_name]

    # ------------------------------------------------------------- generation
    def thetas(self, records: Sequence[EmbeddedClient]) -> list[torch.Tensor]:
        """theta_i(phi) of these clients, with autograd: clients of one tau go through the
        feature extractor together, then through their heads."""
        groups: dict[int, list[int]] = {}
        for index, record in enumerate(records):
            groups.setdefault(record.tau, []).append(index)
        out: list[torch.Tensor | None] = [None] * len(records)
        for members in groups.values():
            group = [records[i] for i in members]
            features = self.hnet.feature_extractor(torch.stack([self.embedding(r) for r in group]))
            by_head: dict[str, list[int]] = {}
            for position, record in enumerate(group):
                by_head.setdefault(record.head, []).append(position)
            for positions in by_head.values():
                thetas = self.apply_heads([group[p] for p in positions], features[positions])
                for position, theta in zip(positions, thetas, strict=True):
                    out[members[position]] = theta
        return out  # type: ignore[return-value]

    def generate(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Current theta_i (float32, CPU) for each key, each generated on its own: batched
        matrix kernels round differently with the batch size, and a client's vector must not
        depend on which other clients are generated with it (partial participation, a client
        that drops out, an evaluation riding on a train exchange)."""
        return {key: self.vector(self.record(key)) for key in keys}

    def remember_generation(self, keys: Sequence[str]) -> None:
        """Keep the values these clients' vectors were just generated from, until their
        deltas are applied (`hypernetwork.vjp_at: generated`)."""
        for key in keys:
            record = self.record(key)
            self.generated_from.remember(key, self.trainable_parameters([record]))

    def vector(self, record: EmbeddedClient) -> np.ndarray:
        with torch.no_grad():
            (theta,) = self.thetas([record])
        return theta.detach().to("cpu", torch.float32).numpy()

    # ---------------------------------------------------------------- freezing
    def freeze(self, embedding_lr: float | None = None) -> None:
        """Freeze everything learned so far: the feature extractor, every head and embedding.

        What is registered afterwards (a novel client's embeddings, with `embedding_lr` if
        given, and a head never seen before) still trains; frozen parameters get no gradient,
        so Adam leaves them bit-identical.
        """
        self.frozen = FrozenParts(
            extractor=True,
            heads={r.head for r in self.registered},
            keys={r.key for r in self.registered},
            embedding_lr=embedding_lr,
        )

    def trainable_parameters(self, records: Sequence[EmbeddedClient]) -> list[nn.Parameter]:
        """The parameters an update of these clients moves: the feature extractor, their
        heads and their embeddings, less what is frozen (in a fixed order: it decides how
        the gradient norm is summed)."""
        frozen = self.frozen
        params = [] if frozen.extractor else list(self.hnet.feature_extractor.parameters())
        for head in self.head_order({r.head for r in records} - frozen.heads):
            params += list(self.hnet.heads[head].parameters())
        params += [self.embedding(r) for r in records if r.key not in frozen.keys]
        return params

    # ------------------------------------------------------------------ sizes
    def num_parameters(self) -> int:
        """Trainable scalars on the server (feature extractor, heads, embeddings)."""
        total = sum(p.numel() for p in self.hnet.parameters())
        return total + sum(p.numel() for p in self.embeddings.values())

    def describe(self) -> str:
        taus = sorted({r.tau for r in self.clients.values()})
        return (
            f"{len(self.clients)} clients, {len(taus)} heads (tau {taus}), "
            f"{self.num_parameters() / 1e6:.1f}M parameters on {self.device}"
        )

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        from server_app.hypernetwork_persistence import state_dict

        return state_dict(self)

    @classmethod
    def from_state_dict(
        cls,
        state: dict,
        device: str | torch.device = "cpu",
        memory_budget: float | str = "auto",
        client_memory: float | str = "auto",
    ) -> HypernetworkServer:
        """A saved state, under the budgets of the run that loads it (they are not saved)."""
        from server_app.hypernetwork_persistence import load

        return load(cls, state, device, memory_budget, client_memory)

    def extra_state(self) -> dict:
        """What a subclass adds to the state dict (nothing here)."""
        return {}

    @classmethod
    def options_from_state(cls, state: Mapping) -> dict:
        """Constructor arguments a subclass keeps in its state dict (none here)."""
        return {}

    def restore_extra(self, state: Mapping) -> None:
        """Rebuild a subclass's structure before registrations are replayed (nothing here)."""
