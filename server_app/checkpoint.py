"""Server checkpoints: written atomically every round, so a stopped run can resume.

A checkpoint holds the server state (hypernetwork, embeddings, Adam state, the client registry
of key -> K), the last completed round and the metrics so far. It is written to a temporary
file in the same directory and renamed over the old one, so a crash mid-write never leaves a
truncated checkpoint behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from server_app.state import HypernetworkServer

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = 1


def save_checkpoint(
    path: Path, server: Any, completed_round: int, history: list[dict[str, Any]]
) -> None:
    state = {
        "format": FORMAT,
        "kind": type(server).__name__,
        "round": completed_round,
        "history": history,
        "server": server.state_dict(),
    }
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(
    path: Path, server_class: type = HypernetworkServer, device: str | torch.device = "cpu"
) -> tuple[Any, int, list[dict[str, Any]]]:
    """(server, last completed round, metrics rows so far); server_class is the method's."""
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path} (server.resume must name a run directory)"
        )
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')}, expected {FORMAT}")
    if state.get("kind", server_class.__name__) != server_class.__name__:
        raise ValueError(f"{path} holds a {state['kind']} state, not a {server_class.__name__}")
    server = server_class.from_state_dict(state["server"], device=device)
    return server, int(state["round"]), list(state["history"])
