"""The Local baseline: every client trains its own model and never sends parameters; the
server only asks clients to train and to evaluate (messages without arrays)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

from flwr.app import Message

from common import protocol
from common.config import ExperimentConfig
from server_app.round_loop import RoundLoop
from server_app.server_state import ClientRegistry


class LocalServer(ClientRegistry):
    """Nothing to learn on the server: no vectors, no updates; only who the clients are."""

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Self:
        return cls(cfg.seed, cfg.server.max_params)

    def generate(self, keys: Sequence[str]) -> dict[str, None]:
        return dict.fromkeys(keys)

    def describe(self) -> str:
        return f"{len(self.clients)} clients training locally"

    def state_dict(self) -> dict[str, Any]:
        return self.registry_state()

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str = "cpu", **_: Any) -> Self:
        server = cls.from_registry_state(state)
        return server


class Local(RoundLoop):
    state_class = LocalServer

    def parse_train(self, key: str, reply: Message) -> protocol.TrainResult:
        return protocol.parse_local_train_reply(reply, self.wire.returns)
