"""What a client keeps between messages: BatchNorm statistics, local layers, its own model.

Flower's `context.state` lasts for one run on one SuperNode; a restarted SuperNode starts
empty. With node config `state-dir` (or, without one, the experiment's `client.state_dir`),
every entry is also written to `<state dir>/<client key>/<name>.npz` (atomically), and read
from there when the context has none, so a client's local layers survive a SuperNode restart
and the next run, and a resumed simulation continues with every client's own state.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import quote

import numpy as np
from flwr.app import Array, ArrayRecord, Context

from common.files import atomic_file

PLAIN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")


def folder_name(client_key: str) -> str:
    """A folder name for a key, one per key: plain keys as they are; any other key (`..`,
    `a/b`, unicode) percent-encoded after a leading `%`, which no plain name has; very long
    ones as `%sha256-` and their hash, within file-name limits."""
    if PLAIN.fullmatch(client_key):
        return client_key
    encoded = "%" + quote(client_key, safe="")
    if len(encoded) > 200:
        return "%sha256-" + hashlib.sha256(client_key.encode()).hexdigest()
    return encoded


class ClientStore:
    def __init__(self, context: Context, client_key: str, default_dir: str = "") -> None:
        self.state = context.state
        state_dir = context.node_config.get("state-dir") or default_dir
        self.directory = None
        if state_dir:
            self.directory = Path(str(state_dir)).expanduser() / folder_name(client_key)

    def _path(self, name: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{name}.npz"

    def get(self, name: str) -> dict[str, np.ndarray] | None:
        if name in self.state:
            return {k: v.numpy() for k, v in self.state[name].items()}
        if self.directory is not None and self._path(name).is_file():
            with np.load(self._path(name)) as stored:
                arrays = {k: stored[k] for k in stored.files}
            self.state[name] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
            return arrays
        return None

    def put(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        record = {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
        self.state[name] = ArrayRecord(record)
        if self.directory is None:
            return
        with atomic_file(self._path(name)) as f:
            np.savez(f, **arrays)
