"""Server checkpoints, written atomically and privately, so a stopped run can resume.

A checkpoint holds the server state (for the hypernetwork methods: hypernetwork, embeddings,
Adam state, the client registry of key -> K), the last completed round, the metrics so far,
what the Strategy keeps (novel clients' roles, the salted hashes that bind client keys) and
the settings that define the run. It is written to a temporary file in the same directory
and renamed over the old one, so a crash mid-write never leaves a truncated checkpoint
behind. The file is a header with an HMAC-SHA256 of the payload under a key the server keeps
(server.checkpoint_key_file, made on first use, readable by its owner only), then the payload,
which is loaded with `weights_only=True`: a damaged or altered file is refused (a reader of
the run folder cannot forge one that binds a client key to another secret), and a crafted one
cannot run code. The file is readable by its owner only: it holds every client's model.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import pickle
import secrets
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = 3  # 2: an unkeyed SHA-256 header, refused now (anyone could re-hash a forgery)
MAGIC = b"MH-pFedHN checkpoint\n"
DEFAULT_KEY_FILE = "~/.config/mh-pfedhn/checkpoint.key"
PRIVATE = 0o600


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says what is wrong and what to do."""


@dataclass
class Checkpoint:
    server: Any  # the method's server state
    round: int  # the last completed round
    history: list[dict[str, Any]]  # metrics rows so far
    strategy: dict[str, Any] = field(default_factory=dict)  # RoundLoop.strategy_state()
    settings: dict[str, Any] = field(default_factory=dict)  # config.defining_settings()


def checkpoint_key(key_file: str | Path = "") -> bytes:
    """The server's checkpoint key: read from `key_file` (default DEFAULT_KEY_FILE), or made
    there (32 random bytes, mode 0600, its folder 0700) when there is none yet."""
    path = Path(key_file or DEFAULT_KEY_FILE).expanduser()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE)
        except FileExistsError:  # made meanwhile by another process: use that one
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
    key = path.read_bytes()
    if len(key) < 16:
        raise CheckpointError(f"{path} holds {len(key)} bytes: a checkpoint key needs 16 or more")
    return key


def _mac(key: bytes, payload: bytes | memoryview) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).hexdigest().encode()


def save_checkpoint(path: Path, checkpoint: Checkpoint, key: bytes | None = None) -> None:
    key = checkpoint_key() if key is None else key
    state = {
        "format": FORMAT,
        "kind": type(checkpoint.server).__name__,
        "round": checkpoint.round,
        "history": checkpoint.history,
        "server": checkpoint.server.state_dict(),
        "strategy": checkpoint.strategy,
        "settings": checkpoint.settings,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE), "wb") as f:
        f.write(MAGIC + _mac(key, payload) + b"\n")
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(
    path: Path,
    server_class: type,
    device: str | torch.device = "cpu",
    key: bytes | None = None,
    **server_options: Any,
) -> Checkpoint:
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # a write that was killed
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path} (server.resume must name a run directory)"
        )
    state = _read(path, checkpoint_key() if key is None else key)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: checkpoint format {found}, expected {FORMAT}")
    if state.get("kind") != server_class.__name__:
        raise CheckpointError(
            f"{path} holds a {state.get('kind')} state, not a {server_class.__name__}: "
            "resume with the method that made it"
        )
    return Checkpoint(
        server_class.from_state_dict(state["server"], device=device, **server_options),
        int(state["round"]),
        list(state["history"]),
        dict(state.get("strategy", {})),
        dict(state.get("settings", {})),
    )


def _read(path: Path, key: bytes) -> Any:
    """The verified payload; a damaged, altered or foreign file raises CheckpointError."""
    damaged = (f"{path} is damaged or not a checkpoint of this project ({{}}): resume from a "
               "copy, or start the run again without server.resume")  # fmt: skip
    data = path.read_bytes()
    header, _, payload = data[len(MAGIC) :].partition(b"\n")
    if not data.startswith(MAGIC) or len(header) != 64:
        raise CheckpointError(damaged.format("no checkpoint header"))
    if not hmac.compare_digest(_mac(key, payload), header):
        raise CheckpointError(
            damaged.format(
                "its authentication does not match: bytes changed, or it was made by another "
                "server (another server.checkpoint_key_file) or by a version before format 3"
            )
        )
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(damaged.format(f"{type(err).__name__}: {err}"[:300])) from None


class CheckpointWriter:
    """Writes a run's checkpoints; with `client_state` (the folder simulated clients keep
    their state in, on this machine) also a copy of it as it was at that round, so that a
    resumed run continues with every client's own state exactly as the server left it."""

    def __init__(
        self, path: Path, client_state: Path | None = None, key: bytes | None = None
    ) -> None:
        self.path = path
        self.client_state = client_state
        self.key = key

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
            os.chmod(tmp, 0o700)  # the clients' secrets and models are in it
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        save_checkpoint(self.path, checkpoint, self.key)
        if self.client_state is not None:
            keep = self._snapshot(checkpoint.round).name
            for old in self._snapshots():
                if old.name != keep:
                    shutil.rmtree(old, ignore_errors=True)

    def _snapshots(self) -> list[Path]:
        """The clients' copies kept beside checkpoints (none without client_state)."""
        if self.client_state is None:
            return []
        return list(self.client_state.parent.glob(f"{self.client_state.name}.round*"))

    def remove(self) -> None:
        """Delete the checkpoint and the clients' copy that goes with it (a finished run's,
        for the disk: such a run can then only be run again from round 0)."""
        self.path.unlink(missing_ok=True)
        for copy in self._snapshots():
            shutil.rmtree(copy, ignore_errors=True)

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
