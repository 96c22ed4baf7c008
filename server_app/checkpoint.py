"""Server checkpoints, written atomically, so a stopped run can resume.

A checkpoint holds the server state (for the hypernetwork methods: hypernetwork, embeddings,
Adam state, the client registry of key -> K), the last completed round, the metrics so far
and what the Strategy keeps (for example novel clients' roles). It is written to a temporary
file in the same directory and renamed over the old one, so a crash mid-write never leaves a
truncated checkpoint behind.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = 1


@dataclass
class Checkpoint:
    server: Any  # the method's server state
    round: int  # the last completed round
    history: list[dict[str, Any]]  # metrics rows so far
    strategy: dict[str, Any] = field(default_factory=dict)  # RoundLoop.strategy_state()
    settings: dict[str, Any] = field(default_factory=dict)  # config.defining_settings()


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    state = {
        "format": FORMAT,
        "kind": type(checkpoint.server).__name__,
        "round": checkpoint.round,
        "history": checkpoint.history,
        "server": checkpoint.server.state_dict(),
        "strategy": checkpoint.strategy,
        "settings": checkpoint.settings,
    }
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(
    path: Path, server_class: type, device: str | torch.device = "cpu", **server_options: Any
) -> Checkpoint:
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path} (server.resume must name a run directory)"
        )
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')}, expected {FORMAT}")
    if state.get("kind", server_class.__name__) != server_class.__name__:
        raise ValueError(f"{path} holds a {state['kind']} state, not a {server_class.__name__}")
    return Checkpoint(
        server_class.from_state_dict(state["server"], device=device, **server_options),
        int(state["round"]),
        list(state["history"]),
        dict(state.get("strategy", {})),
        dict(state.get("settings", {})),
    )


class CheckpointWriter:
    """Writes a run's checkpoints; with `client_state` (the folder simulated clients keep
    their state in, on this machine) also a copy of it as it was at that round, so that a
    resumed run continues with every client's own state exactly as the server left it."""

    def __init__(self, path: Path, client_state: Path | None = None) -> None:
        self.path = path
        self.client_state = client_state

    def _snapshot(self, server_round: int) -> Path:
        assert self.client_state is not None
        return self.client_state.with_name(f"{self.client_state.name}.round{server_round}")

    def save(self, checkpoint: Checkpoint) -> None:
        """The clients' copy first, then the checkpoint that refers to it, then older copies
        go: a crash at any point leaves a checkpoint with its copy."""
        if self.client_state is not None:
            target = self._snapshot(checkpoint.round)
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            if self.client_state.is_dir():
                shutil.copytree(self.client_state, tmp)
            else:
                tmp.mkdir(parents=True)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        save_checkpoint(self.path, checkpoint)
        if self.client_state is not None:
            keep = self._snapshot(checkpoint.round).name
            for old in self.client_state.parent.glob(f"{self.client_state.name}.round*"):
                if old.name != keep:
                    shutil.rmtree(old, ignore_errors=True)

    def restore_client_state(self, server_round: int) -> None:
        """Put the clients' state back as it was at the checkpoint's round."""
        if self.client_state is None:
            return
        snapshot = self._snapshot(server_round)
        if not snapshot.is_dir():
            raise FileNotFoundError(
                f"{snapshot} is missing: the clients' state at round {server_round} is gone, "
                "so the run cannot continue exactly; start it again"
            )
        shutil.rmtree(self.client_state, ignore_errors=True)
        shutil.copytree(snapshot, self.client_state)
