"""Novel clients (paper 4.4): they join after round `join_round`, when the hypernetwork is
frozen; from then on only they train, and only their embeddings (and heads for taus never
seen) learn. Used by the hypernetwork methods that declare `novel_clients`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from common import protocol
from common.config import GeneralizationConfig
from server_app.hypernetwork_server import HypernetworkServer
from server_app.server_state import ClientRecord, RegistrationError, validate_num_params

logger = logging.getLogger("flwr.mh_pfedhn")

TRAINING, NOVEL = protocol.ROLES


class NovelClients:
    def __init__(self, settings: GeneralizationConfig, state: HypernetworkServer) -> None:
        self.join_round = settings.join_round  # 0: no generalization phase
        self.embedding_lr = settings.embedding_lr
        self.state = state
        self.roles: dict[str, str] = {}  # client key -> TRAINING | NOVEL
        self.waiting: dict[str, protocol.Identity] = {}  # novel clients not yet joined

    def generalizing(self, server_round: int) -> bool:
        """After the join round only novel clients train, on a frozen hypernetwork."""
        return 0 < self.join_round < server_round

    def role(self, key: str) -> str | None:
        return self.roles.get(key)

    def admit_or_hold(
        self,
        identity: protocol.Identity,
        server_round: int,
        register: Callable[[protocol.Identity], ClientRecord],
    ) -> ClientRecord | None:
        """Register a training client now; hold a novel one until the join (None).

        A client first seen after the join is novel whatever it reports; a known key keeps
        the role it had.
        """
        key = identity.client_key
        role = self.roles.get(key) or (NOVEL if self.generalizing(server_round) else identity.role)
        if role == NOVEL and not self.join_round:
            raise RegistrationError(
                f"client {key!r} is novel but this run has no generalization phase "
                "(set generalization.join_round)"
            )
        if role == NOVEL and not self.generalizing(server_round):
            validate_num_params(identity.num_params, self.state.registry.max_params)
            self.roles[key] = role
            self.waiting[key] = identity
            return None
        record = register(identity)
        self.roles[key] = role
        return record

    def join(self, register: Callable[[protocol.Identity], ClientRecord]) -> dict[str, str]:
        """The end of training: freeze the hypernetwork, then register the novel clients
        (their embeddings, and heads never seen, are created trainable); returns the ones
        whose registration was refused, with why."""
        self.state.freeze(self.embedding_lr)
        refused = {}
        for key, identity in sorted(self.waiting.items()):
            try:
                record = register(identity)
            except RegistrationError as err:
                refused[key] = str(err)
                continue
            new_head = record.head not in self.state.frozen.heads
            logger.info("novel client %s joins: K=%d, tau=%d%s", key, record.num_params,
                        record.tau, " (new head)" if new_head else "")  # fmt: skip
        self.waiting.clear()
        logger.info("hypernetwork frozen after round %d: %s", self.join_round,
                    self.state.describe())  # fmt: skip
        return refused

    def state_dict(self) -> dict[str, Any]:
        return {"roles": dict(self.roles)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.roles = dict(state.get("roles", {}))
