"""MH-pFedHNGD (and MH-pFedHNG): a global model in a second fit phase (paper 3.3, Algorithm 2).

Each round, before the personalized phase of MH-pFedHN:
phase 1 sends the global vector w_g = h(v_g)[:K_g] to a seeded fraction of the sampled clients
(`train.global`); they train it with cross-entropy and return Delta w_g,i and m_i; the server
takes ONE step on sum_i (m_i / M) VJP(w_g, Delta w_g,i), which moves only the feature
extractor, the head of tau_g (shared with clients of that tau) and v_g. Phase 1 is parallel by
nature, whatever the schedule (as in the authors' code).
Phase 2 is MH-pFedHN's `train` round, by the configured schedule; clients that took part in
phase 1 are told to distill from a teacher ((1 - a) CE + a T^2 KL) unless distillation is off
(MH-pFedHNG). The global model's pooled accuracy on every client's test split is reported.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from common import protocol
from common.config import ExperimentConfig
from common.seeding import stable_seed
from server_app.hypernetwork_rounds import HypernetworkRounds
from server_app.hypernetwork_server import GLOBAL_KEY, HypernetworkServer
from server_app.round_loop import logger
from server_app.server_state import ClientRecord, RegistrationError, UpdateRejected


class MHpFedHNGD(HypernetworkRounds):
    def __init__(self, state: HypernetworkServer, cfg: ExperimentConfig, **kwargs: Any) -> None:
        super().__init__(state, cfg, **kwargs)
        self.global_keys: list[str] = []  # this round's phase-1 clients
        self.regenerated: np.ndarray | None = None  # w_g after phase 1, if it is the teacher

    def register(self, identity: protocol.Identity) -> ClientRecord:
        """Clients also report K_g, the size of the public global model on their data; both
        sizes are checked before anything is registered."""
        k_g = identity.global_num_params
        if k_g is None:
            raise RegistrationError("reply lacks global-num-params (needed by MH-pFedHNG/GD)")
        if GLOBAL_KEY in self.state.clients:
            known = self.state.record(GLOBAL_KEY).num_params
            if k_g != known:
                raise RegistrationError(
                    f"client reports a global model of K_g={k_g}, but the global model has "
                    f"K_g={known}: its data has other classes or channels"
                )
        self.state.check((identity.client_key, identity.num_params), (GLOBAL_KEY, k_g))
        record = super().register(identity)
        if GLOBAL_KEY not in self.state.clients:
            glob = self.state.register_global(k_g)
            logger.info("global model %s: K=%d, tau=%d", self.cfg.global_model.architecture,
                        glob.num_params, glob.tau)  # fmt: skip
        return record

    def sample_global(self, server_round: int, keys: list[str]) -> list[str]:
        """Seeded share of the sampled clients that run phase 1 (paper C.10)."""
        fraction = self.cfg.global_model.fraction
        if fraction >= 1.0 or not keys:
            return list(keys)
        count = max(1, int(round(fraction * len(keys))))
        rng = np.random.default_rng(stable_seed(self.cfg.seed, "global", server_round))
        return sorted(keys[i] for i in rng.choice(len(keys), count, replace=False))

    # ---------------------------------------------------------------- phase 1
    def global_phase(self, grid: Grid, server_round: int) -> None:
        keys = self.global_keys
        if not keys or GLOBAL_KEY not in self.state.clients:
            return
        w_g = self.state.generate([GLOBAL_KEY])[GLOBAL_KEY]
        messages = self.messages(
            keys, protocol.TRAIN_GLOBAL, server_round, vectors=dict.fromkeys(keys, w_g)
        )
        limit = self.cfg.server.max_delta_abs
        results = self.exchange(
            grid,
            messages,
            lambda key, r: protocol.parse_train_reply(r, len(w_g), limit),
            phase=" (global phase)",
        )
        results = {k: self.bounded(k, results[k]) for k in sorted(results)}  # not arrival order
        weights = self.weights(results)
        total = sum(weights.values())
        started = time.perf_counter()
        try:
            self.state.apply_weighted_delta(
                GLOBAL_KEY, [r.delta for r in results.values()],
                [weights[k] / total for k in results],
            )  # fmt: skip
        except UpdateRejected as err:
            for key in results:
                self.round.reject(f"{key} (global phase)", str(err))
            return
        loss = sum(r.train_loss * weights[k] for k, r in results.items())
        self.round.values.update(
            global_clients_trained=len(results),
            global_train_loss=loss / total if total else None,
            global_update_seconds=time.perf_counter() - started,
        )

    def instruction_extras(self, message_type: str, key: str) -> tuple[dict, np.ndarray | None]:
        """Phase-2 clients that took part in phase 1 distill from the chosen teacher."""
        if message_type != protocol.TRAIN or not self.cfg.distills or key not in self.global_keys:
            return {}, None
        g = self.cfg.global_model
        config = {
            "distill": True,
            "distill-weight": g.distill_weight,
            "temperature": g.temperature,
            "teacher": g.teacher,
        }
        return config, self.regenerated if g.teacher == "regenerated" else None

    def parallel_round(self, server_round: int) -> bool:
        return False  # phase 2's vectors come after phase 1's step: evaluated on their own

    def train_round(self, grid: Grid, server_round: int) -> None:
        """Phase 1, then phase 2. Novel clients (after the join) have no phase 1: the global
        model is part of the frozen hypernetwork, and they do not distill."""
        clients = self.round_clients(server_round, grid)
        generalizing = self.generalizing(server_round)
        self.global_keys = [] if generalizing else self.sample_global(server_round, clients)
        self.global_phase(grid, server_round)
        self.regenerated = None
        has_global = GLOBAL_KEY in self.state.clients
        if self.cfg.global_model.teacher == "regenerated" and not generalizing and has_global:
            self.regenerated = self.state.generate([GLOBAL_KEY])[GLOBAL_KEY]
        super().train_round(grid, server_round)

    # ------------------------------------------------------------- evaluation
    def evaluate_round(self, grid: Grid, server_round: int) -> None:
        """Personalized evaluation, then w_g on every client's test split (global_*)."""
        super().evaluate_round(grid, server_round)
        keys = self.connected_clients(grid)
        if not keys or GLOBAL_KEY not in self.state.clients:
            return
        w_g = self.state.generate([GLOBAL_KEY])[GLOBAL_KEY]
        messages = self.messages(
            keys, protocol.EVALUATE_GLOBAL, server_round, vectors=dict.fromkeys(keys, w_g)
        )
        stats = self.evaluation_stats(self.exchange(grid, messages, self.parse_evaluate))
        if stats is not None:
            stats.pop("clients_evaluated")
            self.round.values.update({f"global_{k}": v for k, v in stats.items()})

    def summary(self) -> None:
        super().summary()
        g = self.cfg.global_model
        logger.info(
            "%s: global model %s, phase-1 fraction %.2f, %s",
            self.cfg.method,
            g.architecture,
            g.fraction,
            f"distillation a={g.distill_weight} T={g.temperature} teacher={g.teacher}"
            if self.cfg.distills
            else "no distillation",
        )
