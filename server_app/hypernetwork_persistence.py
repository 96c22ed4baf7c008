"""Saving and rebuilding a hypernetwork server state bit for bit (server_app/checkpoint.py
writes it): weights, Adam state, the registrations in their order, what is frozen.

A state is rebuilt by replaying the registrations in their original order (the optimizer's
parameter groups come back in the same order), then loading the tensors and Adam's state.
Older checkpoints load too: the schedule was once `update_mode`, heads were frozen by tau,
and MH-pFedHNGD's global model was registered as a client named `__global__`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TypeVar

import torch

from common.config import DEFAULT_MAX_PARAMS
from server_app.hypernetwork_server import FrozenParts, HypernetworkServer, HypernetworkSettings

GLOBAL_MARKER = "__global__"  # MH-pFedHNGD's global model in the list of registrations
State = TypeVar("State", bound=HypernetworkServer)


def settings_from_dict(values: Mapping) -> HypernetworkSettings:
    """Settings as a checkpoint stored them (older ones named the schedule `update_mode` and
    kept max_params here)."""
    values = dict(values)
    values.pop("max_params", None)
    legacy = values.pop("update_mode", None)
    if legacy is not None:
        values["schedule"] = {"sequential": "parallel_sequential", "batched": "parallel_mean"}[
            legacy
        ]
    return HypernetworkSettings(**values)


def state_dict(server: HypernetworkServer) -> dict:
    """Everything needed to continue bit for bit: weights, Adam state, registrations, seed."""
    registrations = [
        (record.key if record.key in server.clients else GLOBAL_MARKER, record.num_params)
        for record in server.registered
    ]
    return {
        "settings": dataclasses.asdict(server.settings),
        "seed": server.seed,
        "max_params": server.registry.max_params,
        "clients": registrations,
        "hnet": server.hnet.state_dict(),
        "embeddings": server.embeddings.state_dict(),
        "optimizer": server.optimizer.state_dict(),
        "frozen": {
            "extractor": server.frozen.extractor,
            "heads": sorted(server.frozen.heads),
            "keys": sorted(server.frozen.keys),
            "embedding_lr": server.frozen.embedding_lr,
        },
        **server.extra_state(),
    }


def load(
    cls: type[State],
    state: dict,
    device: str | torch.device = "cpu",
    memory_budget: float | str = "auto",
    client_memory: float | str = "auto",
) -> State:
    server = cls(
        settings_from_dict(state["settings"]),
        seed=state["seed"],
        device=device,
        max_params=state.get("max_params", DEFAULT_MAX_PARAMS),
        memory_budget=memory_budget,
        client_memory=client_memory,
        **cls.options_from_state(state),
    )
    server.restore_extra(state)
    for key, num_params in state["clients"]:
        if key == GLOBAL_MARKER:
            server.register_global(num_params)  # type: ignore[attr-defined]
        else:
            server.clients[key] = server.add(key, server.registry.check(key, num_params))
    server.hnet.load_state_dict(state["hnet"])
    server.embeddings.load_state_dict(state["embeddings"])
    server.optimizer.load_state_dict(state["optimizer"])
    frozen = state.get("frozen") or {}
    server.frozen = FrozenParts(
        extractor=bool(frozen.get("extractor", False)),
        heads={h if isinstance(h, str) else f"tau{h}" for h in frozen.get("heads", ())},
        keys=set(frozen.get("keys", ())),
        embedding_lr=frozen.get("embedding_lr"),
    )
    return server
