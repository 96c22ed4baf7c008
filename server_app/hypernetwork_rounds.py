"""Rounds of the hypernetwork methods (MH-pFedHN, MH-pFedHNGD, pFedHN): the round schedule
(server_app/schedules.py) and, where the method declares it, novel clients."""

from __future__ import annotations

import time
from typing import Any

from flwr.serverapp import Grid

from common import protocol
from common.config import ExperimentConfig
from server_app.hypernetwork_server import HypernetworkServer
from server_app.novel_clients import NOVEL, TRAINING, NovelClients
from server_app.round_loop import RoundLoop, logger
from server_app.schedules import ONE_BY_ONE, client_order
from server_app.server_state import ClientRecord, UpdateRejected


class HypernetworkRounds(RoundLoop):
    state: HypernetworkServer

    def __init__(self, state: HypernetworkServer, cfg: ExperimentConfig, **kwargs: Any) -> None:
        # before the base restores a checkpoint's strategy state into it
        self.novel = (
            NovelClients(cfg.generalization, state) if cfg.method_spec.novel_clients else None
        )
        super().__init__(state, cfg, **kwargs)

    # ------------------------------------------------------- admission
    def admit(self, identity: protocol.Identity) -> ClientRecord | None:
        if self.novel is None:
            return super().admit(identity)
        return self.novel.admit(identity, self.round.round, self.register)

    def log_admission(self, identity: protocol.Identity, record: ClientRecord | None) -> None:
        key = identity.client_key
        if record is None:
            logger.info("client %s: novel, joins after round %d", key, self.novel.join_round)
            return
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
            self.novel.join(self.round, self.register)

    # ------------------------------------------------------------ train
    def parallel_round(self, server_round: int) -> bool:
        return self.cfg.hypernetwork.schedule != ONE_BY_ONE

    def train_round(self, grid: Grid, server_round: int) -> None:
        if self.cfg.hypernetwork.schedule == ONE_BY_ONE:
            self.train_one_by_one(grid, server_round)
        else:
            super().train_round(grid, server_round)

    def train_one_by_one(self, grid: Grid, server_round: int) -> None:
        """The authors' round: for each client in a seeded order, generate its theta from the
        hypernetwork as it is now, let it train, step, and only then go on to the next."""
        keys = self.round_clients(server_round, grid)
        results: dict[str, protocol.TrainResult] = {}
        update_s = 0.0
        for key in client_order(self.state.seed, keys, server_round):
            messages = self.messages([key], protocol.TRAIN, server_round)
            reply = self.exchange(grid, messages, self.parse_train)
            if key not in reply:
                continue
            result = self.bounded(key, reply[key])
            started = time.perf_counter()
            try:
                self.state.step_client(key, result.delta)
            except UpdateRejected as err:
                self.round.reject(key, str(err))
                continue
            finally:
                update_s += time.perf_counter() - started
            results[key] = result
        self.record_training(results, update_s)

    # --------------------------------------------------------- evaluate
    def evaluation_stats(self, results):
        stats = super().evaluation_stats(results)
        if stats is None or self.novel is None or not self.novel.join_round:
            return stats
        for role in (TRAINING, NOVEL):
            group = [r for k, r in results.items() if self.novel.role(k) == role]
            n = sum(r.num_examples for r in group)
            stats[f"{role}_accuracy"] = sum(r.correct for r in group) / n if n else None
            stats[f"{role}_clients"] = len(group)
        return stats

    # ------------------------------------------------------ checkpoint
    def strategy_state(self) -> dict[str, Any]:
        state = super().strategy_state()
        if self.novel is not None:
            state["novel_clients"] = self.novel.state_dict()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        super().restore(state)
        if self.novel is not None and "novel_clients" in state:
            self.novel.load_state_dict(state["novel_clients"])
