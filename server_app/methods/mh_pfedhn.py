"""MH-pFedHN (paper Algorithm 1, docs/concepts/algorithm.md): a multi-head hypernetwork
generates every client's own parameter vector from its embeddings (server_app/
hypernetwork_server.py); clients return "sent minus trained", and each delta becomes a step of
the feature extractor, the client's head and its embeddings (server_app/hypernetwork_steps.py)
in the order the round schedule says (server_app/schedules.py: `one_by_one`, the authors'
round, by default). Novel clients join after training, on a frozen hypernetwork (paper 4.4).

MH-pFedHNGD and pFedHN are this round with a global model, or with other heads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from common import protocol
from common.config import ExperimentConfig
from server_app.hypernetwork_server import EmbeddedClient, HypernetworkServer
from server_app.novel_clients import NOVEL, TRAINING, NovelClients
from server_app.round_loop import RoundLoop, RoundOutcome, logger, reject
from server_app.server_state import ClientRecord


class MHpFedHN(RoundLoop):
    state: HypernetworkServer
    state_class = HypernetworkServer

    def __init__(self, state: HypernetworkServer, cfg: ExperimentConfig, **kwargs: Any) -> None:
        super().__init__(state, cfg, **kwargs)
        supported = self.method.novel_clients
        self.novel = NovelClients(cfg.generalization, state) if supported else None

    # ------------------------------------------------------------ admission
    def admit(self, identity: protocol.Identity, server_round: int) -> ClientRecord | None:
        if self.novel is None:
            return super().admit(identity, server_round)
        return self.novel.admit_or_hold(identity, server_round, self.register)

    def log_admission(self, identity: protocol.Identity, record: ClientRecord | None) -> None:
        key = identity.client_key
        if record is None:
            logger.info("client %s: novel, joins after round %d", key, self.novel.join_round)
            return
        assert isinstance(record, EmbeddedClient)
        novel = self.novel is not None and self.novel.role(key) == NOVEL
        logger.info("client %s: K=%d, tau=%d%s", key, record.num_params, record.tau,
                    " (novel)" if novel else "")  # fmt: skip

    def generalizing(self, server_round: int) -> bool:
        return self.novel is not None and self.novel.generalizing(server_round)

    def eligible(self, server_round: int, keys: list[str]) -> list[str]:
        if self.novel is None:
            return keys
        role = NOVEL if self.generalizing(server_round) else TRAINING
        return [k for k in keys if self.novel.role(k) == role]

    def after_train(self, server_round: int) -> None:
        if self.novel is not None and 0 < self.novel.join_round == server_round:
            for key, reason in self.novel.join(self.register).items():
                reject(server_round, key, reason)

    # ---------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The train messages; with clients in flight and `vjp_at: generated`, the state keeps
        what their vectors were generated from until their deltas are applied."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.schedule.remembers_generation:
            self.state.remember_generation([self.key_of(m) for m in messages])
        return messages

    def train_round(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        timeout: float,
        evaluate_previous: bool,
    ) -> RoundOutcome:
        try:
            return super().train_round(grid, server_round, arrays, config, timeout,
                                       evaluate_previous)  # fmt: skip
        finally:  # whatever did not come back is no longer in flight
            self.state.generated_from.clear()

    def apply_train(
        self, server_round: int, results: Mapping[str, protocol.TrainResult]
    ) -> dict[str, str]:
        """The schedule's steps of the hypernetwork (per client; examples do not weigh)."""
        deltas = {k: r.delta for k, r in results.items()}
        return self.schedule.apply(self.state, deltas, server_round).rejected if deltas else {}

    # ------------------------------------------------------------- evaluate
    def evaluation_stats(self, results: Mapping[str, protocol.EvalResult]) -> dict[str, Any] | None:
        stats = super().evaluation_stats(results)
        if stats is None or self.novel is None or not self.novel.join_round:
            return stats
        for role in (TRAINING, NOVEL):
            group = [r for k, r in results.items() if self.novel.role(k) == role]
            n = sum(r.num_examples for r in group)
            stats[f"{role}_accuracy"] = sum(r.correct for r in group) / n if n else None
            stats[f"{role}_clients"] = len(group)
        return stats

    # ----------------------------------------------------------- checkpoint
    def strategy_state(self) -> dict[str, Any]:
        state = super().strategy_state()
        if self.novel is not None:
            state["novel_clients"] = self.novel.state_dict()
        return state

    def restore(self, state: Mapping[str, Any]) -> None:
        super().restore(state)
        if self.novel is not None and "novel_clients" in state:
            self.novel.load_state_dict(state["novel_clients"])
