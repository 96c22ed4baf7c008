"""MH-pFedHNGD (and MH-pFedHNG): a global model in a second fit phase (paper 3.3, Algorithm 2).

Each round, before the personalized phase of MH-pFedHN:
phase 1 sends the global vector w_g = h(v_g)[:K_g] to a seeded fraction of the sampled clients
(`train.global`); they train it with cross-entropy and return Delta w_g,i and m_i; the server
takes ONE step on sum_i (m_i / M) VJP(w_g, Delta w_g,i), which moves only the feature
extractor, the head of tau_g (shared with clients of that tau) and v_g.
Phase 2 is MH-pFedHN's `train` round; clients that took part in phase 1 are told to distill
from a teacher ((1 - a) CE + a T^2 KL) unless distillation is off (MH-pFedHNG).
The global model's pooled accuracy on every client's test split is reported each round.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import MetricRecord
from flwr.serverapp import Grid

from common import protocol
from common.seeding import stable_seed
from server_app.state import GLOBAL_KEY, ClientRecord, RegistrationError
from server_app.strategy import MHpFedHN, logger


class MHpFedHNGD(MHpFedHN):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.global_keys: list[str] = []  # this round's phase-1 clients
        self._regenerated: np.ndarray | None = None  # w_g after phase 1, if it is the teacher

    def admit(self, identity: protocol.Identity) -> ClientRecord:
        """Clients also report K_g, the size of the public global model on their data."""
        if identity.global_num_params is None:
            raise RegistrationError("reply lacks global-num-params (needed by MH-pFedHNG/GD)")
        if GLOBAL_KEY in self.server.clients:
            known = self.server.record(GLOBAL_KEY).num_params
            if identity.global_num_params != known:
                raise RegistrationError(
                    f"client reports a global model of K_g={identity.global_num_params}, but the "
                    f"global model has K_g={known}: its data has other classes or channels"
                )
        record = super().admit(identity)
        if GLOBAL_KEY not in self.server.clients:
            glob = self.server.register_global(identity.global_num_params)
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
    def global_phase(self, grid: Grid, server_round: int, timeout: float) -> None:
        keys = self.global_keys
        if not keys:
            return
        w_g = self.server.generate([GLOBAL_KEY])[GLOBAL_KEY]
        messages = self._messages(
            keys, protocol.TRAIN_GLOBAL, server_round, vectors=dict.fromkeys(keys, w_g)
        )
        results = self.parse_replies(
            self._exchange(grid, messages, timeout),
            lambda key, r: protocol.parse_train_reply(r, len(w_g)),
            phase=" (global phase)",
        )
        total = sum(r.num_examples for r in results.values())
        ordered = [results[k] for k in sorted(results)]  # arrival order must not matter
        started = time.perf_counter()
        self.server.apply_weighted_delta(
            GLOBAL_KEY, [r.delta for r in ordered], [r.num_examples / total for r in ordered]
        )
        self._log.values.update(
            global_clients_trained=len(results),
            global_train_loss=(
                sum(r.train_loss * r.num_examples for r in results.values()) / total
                if total
                else None
            ),
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
        teacher = self._regenerated if g.teacher == "regenerated" else None
        return config, teacher

    def train_round(self, grid: Grid, server_round: int, timeout: float) -> MetricRecord | None:
        """Phase 1, then phase 2. Novel clients (after the join) have no phase 1: the global
        model is part of the frozen hypernetwork, and they do not distill."""
        clients = self.round_clients(server_round, grid)
        generalizing = self.generalizing(server_round)
        self.global_keys = [] if generalizing else self.sample_global(server_round, clients)
        self.global_phase(grid, server_round, timeout)
        self._regenerated = None
        if self.cfg.global_model.teacher == "regenerated" and not generalizing:
            self._regenerated = self.server.generate([GLOBAL_KEY])[GLOBAL_KEY]
        return super().train_round(grid, server_round, timeout)

    # ------------------------------------------------------------- evaluation
    def evaluate_round(self, grid: Grid, server_round: int, timeout: float) -> MetricRecord | None:
        """Personalized evaluation, then w_g on every client's test split (global_*)."""
        metrics = super().evaluate_round(grid, server_round, timeout)
        keys = self.connected_clients(grid)
        w_g = self.server.generate([GLOBAL_KEY])[GLOBAL_KEY]
        messages = self._messages(
            keys, protocol.EVALUATE_GLOBAL, server_round, vectors=dict.fromkeys(keys, w_g)
        )
        stats = self.evaluation_stats(self._exchange(grid, messages, timeout))
        if stats is not None:
            stats.pop("clients_evaluated")
            self._log.values.update({f"global_{k}": v for k, v in stats.items()})
        return metrics

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
