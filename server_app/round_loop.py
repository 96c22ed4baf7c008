"""The round loop every method shares: a Flower Strategy with its own `start`.

Flower's stock strategies send one global model to everyone; here every node gets its own
vector, so the loop is ours, built from the usual configure/aggregate pieces. Each round:
query nodes not seen before (their key and K), train the sampled clients, then send every
known client its vector for evaluation on its own test split. A method is a subclass that
changes only what differs: who is admitted (`admit`), what a message carries
(`instruction_extras`), how a round trains (`train_round`) and what the replies do
(`aggregate_train`). Replies that are malformed are logged and dropped; they never reach the
server state.

`configure_*` return one Message per client key; `parse_*` check one reply (raising
protocol.ReplyError to refuse it); `aggregate_*` take the parsed results of the round.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from common import protocol
from common.config import ExperimentConfig, defining_settings
from common.seeding import stable_seed
from server_app.checkpoint import Checkpoint, CheckpointWriter
from server_app.client_directory import ClientDirectory
from server_app.defences import DeltaNormBound
from server_app.events import Observers, RunObserver
from server_app.exchange import Exchange
from server_app.round_log import RoundLog, pending_from_state, pending_state, run_summary
from server_app.server_state import (
    ClientRecord,
    RegistrationError,
    ServerState,
    bounded_weights,
)

logger = logging.getLogger("flwr.mh_pfedhn")


class RunAborted(RuntimeError):
    """The run cannot go on (too few clients admitted); the message says why, per node."""


@dataclass
class ResumePoint:
    """Where a checkpointed run stopped: the last completed round, the metrics rows so far,
    and what the Strategy itself keeps (`strategy_state`)."""

    completed_round: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    strategy: dict[str, Any] = field(default_factory=dict)


class RoundLoop(Strategy):
    def __init__(
        self,
        state: ServerState,
        cfg: ExperimentConfig,
        *,
        observers: list[RunObserver] | tuple[RunObserver, ...] = (),
        checkpoints: CheckpointWriter | None = None,
        resume: ResumePoint | None = None,
    ) -> None:
        self.state = state
        self.cfg = cfg
        self.method = cfg.method_spec
        self.observers = Observers(observers)
        self.checkpoints = checkpoints
        self.directory = ClientDirectory(
            require_proof=cfg.server.require_client_proof,
            bind_node_ids=cfg.server.bind_node_ids,
            requery_rounds=cfg.server.requery_rounds,
        )
        self.delta_bound = DeltaNormBound(cfg.server.delta_norm_bound)
        resume = resume or ResumePoint()
        self.completed_round = resume.completed_round
        self.history = list(resume.history)
        self.round = RoundLog(0)  # the round in progress (start() begins a new one each round)
        self.pending: RoundLog | None = None  # a finished round whose evaluation is on its way
        self._sampled: tuple[int, list[str]] = (-1, [])
        self.restore(resume.strategy)

    # ------------------------------------------------------- method hooks
    def admit(self, identity: protocol.Identity) -> ClientRecord | None:
        """Accept a client from its query reply (raise RegistrationError to refuse it;
        None: accepted, but registered later)."""
        if identity.role != "training":
            raise RegistrationError(
                f"client {identity.client_key!r} is {identity.role} but {self.cfg.method} has "
                "no generalization phase"
            )
        return self.register(identity)

    def register(self, identity: protocol.Identity) -> ClientRecord:
        """The registration itself; methods that need more from a client extend this."""
        return self.state.register(identity.client_key, identity.num_params)

    def eligible(self, server_round: int, keys: list[str]) -> list[str]:
        """Which of the connected clients may train this round (all of them here)."""
        return keys

    def instruction_extras(self, message_type: str, key: str) -> tuple[dict, np.ndarray | None]:
        """Extra config and teacher vector for a client's message (none here)."""
        return {}, None

    def after_train(self, server_round: int) -> None:
        """Between a round's training and its evaluation."""

    def strategy_state(self) -> dict[str, Any]:
        """What this Strategy needs to continue after a restart (goes into the checkpoint):
        the keys' bindings (salted hashes only) and the norm bound's history."""
        return {
            "directory": self.directory.state_dict(),
            "delta_norms": self.delta_bound.state_dict(),
            "pending_round": pending_state(self.pending),  # a round awaiting its evaluation
        }

    def restore(self, state: dict[str, Any]) -> None:
        """The inverse of strategy_state (an empty dict for a new run)."""
        self.directory.load_state_dict(state.get("directory", {}))
        self.delta_bound.load_state_dict(state.get("delta_norms", {}))
        self.pending = pending_from_state(state.get("pending_round"))

    # ------------------------------------------------------------ nodes
    def wait_for_nodes(self, grid: Grid) -> None:
        deadline = time.monotonic() + self.cfg.server.wait_for_nodes_s
        needed = self.cfg.server.min_nodes
        while len(list(grid.get_node_ids())) < needed and time.monotonic() < deadline:
            time.sleep(1.0)
        found = len(list(grid.get_node_ids()))
        if found < needed:
            logger.warning("only %d of %d nodes connected; starting anyway", found, needed)

    @property
    def pull_intervals(self) -> tuple[float, float]:
        """The shortest and the longest wait between pulls for replies."""
        return self.cfg.server.pull_interval_s, self.cfg.server.max_pull_interval_s

    def discover(self, grid: Grid, timeout: float) -> None:
        """Query nodes never seen (new or restarted SuperNodes) for their key and K."""
        server_round = self.round.round
        nodes = self.directory.unknown(grid.get_node_ids(), server_round)
        queries = {
            str(n): Message(protocol.instruction(None, 0), dst_node_id=n, message_type="query")
            for n in nodes
        }
        replies, _ = Exchange(grid, *self.pull_intervals).run(queries, timeout)
        for label, reply in sorted(replies.items(), key=lambda item: int(item[0])):
            node = int(label)
            try:
                identity = protocol.parse_identity(reply)
                self.directory.authorize(identity, node)
                record = self.admit(identity)
            except (protocol.ReplyError, RegistrationError) as err:
                self.directory.refuse(node, str(err), server_round)
                continue
            except Exception as err:  # noqa: BLE001 - one reply never stops the server
                logger.exception("node %d: unexpected failure on its query reply", node)
                self.directory.refuse(node, f"unusable reply ({type(err).__name__})",
                                      server_round)  # fmt: skip
                continue
            self.directory.bind(identity, node)
            self.log_admission(identity, record)

    def log_admission(self, identity: protocol.Identity, record: ClientRecord | None) -> None:
        if record is not None:
            logger.info("client %s: K=%d, tau=%d", identity.client_key, record.num_params,
                        record.tau)  # fmt: skip

    def check_admitted(self, grid: Grid) -> None:
        """Stop, naming every refusal, when fewer than server.min_clients were admitted."""
        needed = self.cfg.server.min_clients
        admitted = len(self.directory.node_of)
        if admitted >= needed:
            return
        lines = [f"node {n}: {r.reason}" for n, r in sorted(self.directory.refused.items())]
        silent = sorted(set(grid.get_node_ids()) - set(self.directory.refused)
                        - set(self.directory.key_of))  # fmt: skip
        lines += [f"node {n}: no reply to the query" for n in silent]
        if not list(grid.get_node_ids()):
            lines.append("no node is connected")
        raise RunAborted(
            f"{admitted} client(s) admitted, server.min_clients={needed}:\n  " + "\n  ".join(lines)
        )

    def connected_clients(self, grid: Grid) -> list[str]:
        """Registered clients whose node is connected."""
        live = self.directory.connected(grid.get_node_ids())
        return [k for k in live if k in self.state.clients]

    def sample(self, server_round: int, keys: list[str]) -> list[str]:
        """Seeded fraction of the eligible clients (all of them by default)."""
        fraction = self.cfg.server.fraction_train
        if fraction >= 1.0 or not keys:
            return keys
        count = max(1, int(round(fraction * len(keys))))
        rng = np.random.default_rng(stable_seed(self.cfg.seed, "sample", server_round))
        return sorted(keys[i] for i in rng.choice(len(keys), count, replace=False))

    def round_clients(self, server_round: int, grid: Grid) -> list[str]:
        """The clients sampled for this round (drawn once per round, seeded)."""
        if self._sampled[0] != server_round:
            keys = self.eligible(server_round, self.connected_clients(grid))
            self._sampled = (server_round, self.sample(server_round, keys))
        return self._sampled[1]

    # -------------------------------------------------------- messaging
    def messages(
        self,
        keys: list[str],
        message_type: str,
        server_round: int,
        vectors: Mapping[str, np.ndarray | None] | None = None,
    ) -> dict[str, Message]:
        """One message per client with its own vector (generated now unless given)."""
        vectors = self.state.generate(keys) if vectors is None else vectors
        out = {}
        for key in keys:
            config, teacher = self.instruction_extras(message_type, key)
            content = protocol.instruction(vectors[key], server_round, config, teacher)
            for array in (vectors[key], teacher):
                self.round.bytes_down += 0 if array is None else array.nbytes
            node = self.directory.node_of[key]
            out[key] = Message(content, dst_node_id=node, message_type=message_type)
        return out

    def exchange(
        self,
        grid: Grid,
        messages: Mapping[str, Message],
        parse: Callable[[str, Message], Any],
        phase: str = "",
    ) -> dict[str, Any]:
        """Send the messages; parse(key, reply) each reply as it arrives. Refused replies and
        clients that did not answer in time are logged and left out. bytes_up counts what
        accepted replies carried (sparse when top-p)."""
        results: dict[str, Any] = {}
        timings: list[dict[str, float]] = []

        def on_reply(key: str, reply: Message) -> None:
            timings.append(protocol.read_timings(reply))
            try:
                results[key] = parse(key, reply)
            except protocol.ReplyError as err:
                self.round.reject(f"{key}{phase}", str(err))
                return
            except Exception as err:  # noqa: BLE001 - one reply never stops the server
                logger.exception("%s%s: unexpected failure on its reply", key, phase)
                self.round.reject(f"{key}{phase}", f"unusable reply ({type(err).__name__})")
                return
            self.round.bytes_up += getattr(results[key], "bytes_up", 0)

        exchange = Exchange(grid, *self.pull_intervals)
        started = time.perf_counter()
        _, missing = exchange.run(messages, self.cfg.server.timeout_s, on_reply)
        if messages:
            self.round.timed_exchange(time.perf_counter() - started, timings)
        for key in missing:
            self.round.reject(f"{key}{phase}", "no reply before the timeout")
        return {k: results[k] for k in sorted(results)}

    # ------------------------------------------------------------ train
    def configure_train(self, server_round: int, grid: Grid) -> dict[str, Message]:
        messages = self.messages(
            self.round_clients(server_round, grid), protocol.TRAIN, server_round
        )
        if self.pending is not None:  # the previous round's evaluation travels with them
            for message in messages.values():
                message.content["config"][protocol.EVALUATE_FIRST] = True
        return messages

    def parse_train(self, key: str, reply: Message) -> protocol.TrainResult:
        size = self.state.record(key).num_params
        return protocol.parse_train_reply(reply, size, self.cfg.server.max_delta_abs)

    def bounded(self, key: str, result: protocol.TrainResult) -> protocol.TrainResult:
        """The delta within server.delta_norm_bound (called in the round's seeded order)."""
        delta, scaled = self.delta_bound(result.delta)
        if not scaled:
            return result
        logger.warning("round %d: the delta of %s was scaled down to the norm bound",
                       self.round.round, key)  # fmt: skip
        self.round.values["deltas_scaled"] = self.round.values.get("deltas_scaled", 0) + 1
        return dataclasses.replace(result, delta=delta)

    def weights(self, results: Mapping[str, protocol.TrainResult]) -> dict[str, float]:
        """Example counts, each bounded by server.max_example_weight x the round's median."""
        counts = {k: r.num_examples for k, r in results.items()}
        return bounded_weights(counts, self.cfg.server.max_example_weight)

    def aggregate_train(
        self,
        server_round: int,
        results: Mapping[str, protocol.TrainResult],
        sent: Mapping[str, Message],
    ) -> None:
        """Hand the round's deltas to the server state (which applies them its own way)."""
        results = {k: self.bounded(k, results[k]) for k in sorted(results)}
        started = time.perf_counter()
        info = self.state.apply_deltas(
            {k: r.delta for k, r in results.items()},
            server_round,
            weights=self.weights(results),
            sent={k: protocol.read_theta(sent[k]) for k in results},
        )
        for key, reason in info.get("rejected", {}).items():
            self.round.reject(key, reason)
        applied = {k: r for k, r in results.items() if k not in info.get("rejected", {})}
        self.record_training(applied, time.perf_counter() - started)

    def record_training(
        self, results: Mapping[str, protocol.TrainResult], update_s: float | None = None
    ) -> None:
        """clients_trained and the example-weighted train loss (and the server's time)."""
        weights = self.weights(results)
        examples = sum(weights.values())
        loss = sum(r.train_loss * weights[k] for k, r in results.items())
        values: dict[str, Any] = {
            "clients_trained": len(results),
            "train_loss": loss / examples if examples else float("nan"),
        }
        if update_s is not None:
            per_client = update_s / len(results) if results else 0.0
            values.update(
                server_update_seconds=update_s, server_seconds_per_client_update=per_client
            )
        self.round.values.update(values)

    def parallel_round(self, server_round: int) -> bool:
        """Whether this round sends every client the vector of the round's start in one
        exchange (so the previous round's evaluation can travel with it)."""
        return True

    def train_round(self, grid: Grid, server_round: int) -> None:
        """A parallel round: every sampled client trains the vector of the round's start;
        with a pending evaluation, the clients that do not train are evaluated in the same
        exchange and those that do evaluate what they received before training."""
        messages = self.configure_train(server_round, grid)
        if self.pending is None:
            results = self.exchange(grid, messages, self.parse_train)
        else:
            idle = [k for k in self.connected_clients(grid) if k not in messages]
            extra = self.messages(idle, protocol.EVALUATE, server_round)
            parsed = self.exchange(grid, {**messages, **extra}, lambda key, reply: (
                self.parse_train(key, reply) if key in messages
                else self.parse_evaluate(key, reply)))  # fmt: skip
            results = {k: r for k, r in parsed.items() if k in messages}
            evaluations = {k: r for k, r in parsed.items() if k not in messages}
            evaluations.update({k: r.evaluation for k, r in results.items() if r.evaluation})
            self.finish_pending({k: evaluations[k] for k in sorted(evaluations)})
        self.aggregate_train(server_round, results, messages)

    def finish_pending(self, evaluations: Mapping[str, protocol.EvalResult]) -> None:
        """The previous round's row, now that its evaluation has arrived."""
        log, self.pending = self.pending, None
        stats = self.evaluation_stats(evaluations)
        if stats is not None:
            log.values.update(stats)
        self.finish_row(log)

    def finish_row(self, log: RoundLog) -> None:
        row = log.row()
        self.history.append(row)
        self.observers.round_finished(row, self.cfg.rounds)

    # --------------------------------------------------------- evaluate
    def configure_evaluate(self, server_round: int, grid: Grid) -> dict[str, Message]:
        return self.messages(self.connected_clients(grid), protocol.EVALUATE, server_round)

    def parse_evaluate(self, key: str, reply: Message) -> protocol.EvalResult:
        return protocol.parse_evaluate_reply(reply)

    def evaluation_stats(self, results: Mapping[str, protocol.EvalResult]) -> dict[str, Any] | None:
        """Pooled (total correct / total samples) and per-client accuracy, pooled loss."""
        total = sum(r.num_examples for r in results.values())
        if not total:
            return None
        per_client = {  # a client with no test samples has no accuracy of its own
            k: r.correct / r.num_examples for k, r in sorted(results.items()) if r.num_examples
        }
        stats = {
            "accuracy": sum(r.correct for r in results.values()) / total,
            "accuracy_client_mean": float(np.mean(list(per_client.values()))),
            "loss": sum(r.loss_sum for r in results.values()) / total,
            "clients_evaluated": len(results),
            "client_accuracy": per_client,
        }
        held_out = [r.validation for r in results.values() if r.validation is not None]
        val_total = sum(v.num_examples for v in held_out)
        if val_total:  # pooled over the clients that hold a validation split
            stats["val_accuracy"] = sum(v.correct for v in held_out) / val_total
            stats["val_loss"] = sum(v.loss_sum for v in held_out) / val_total
        return stats

    def aggregate_evaluate(
        self, server_round: int, results: Mapping[str, protocol.EvalResult]
    ) -> None:
        stats = self.evaluation_stats(results)
        if stats is not None:
            self.round.values.update(stats)

    def evaluate_round(self, grid: Grid, server_round: int) -> None:
        messages = self.configure_evaluate(server_round, grid)
        self.aggregate_evaluate(server_round, self.exchange(grid, messages, self.parse_evaluate))

    # ------------------------------------------------------------- loop
    def summary(self) -> None:
        c = self.cfg
        logger.info(
            "%s: %d rounds, %s, data %s (%s), models %s, seed %d",
            c.method,
            c.rounds,
            f"{c.hypernetwork.schedule} schedule" if self.method.schedules else "parallel rounds",
            c.data.source,
            c.data.partitioner,
            ",".join(c.clients.models),
            c.seed,
        )

    def fuses_evaluation(self, server_round: int, num_rounds: int) -> bool:
        """Whether this round's evaluation can travel with the next round's train messages:
        they carry exactly the vectors an evaluate message would (nothing changes in between)."""
        return (
            self.cfg.server.fuse_evaluation
            and server_round < num_rounds
            and self.parallel_round(server_round + 1)
        )

    def evaluation_due(self, server_round: int, num_rounds: int) -> bool:
        every = self.cfg.server.evaluate_every
        if every == 0:
            return False
        join = self.cfg.generalization.join_round
        return server_round in (0, num_rounds, join) or server_round % every == 0

    def _checkpoint(self, server_round: int, num_rounds: int) -> None:
        every = self.cfg.server.checkpoint_every
        if self.checkpoints is None or every == 0:
            return
        if server_round % every == 0 or server_round == num_rounds:
            checkpoint = Checkpoint(self.state, server_round, self.history,
                                    self.strategy_state(), defining_settings(self.cfg))  # fmt: skip
            self.checkpoints.save(checkpoint)
            self.observers.checkpoint_saved(server_round, self.checkpoints.path)

    def start(self, grid: Grid, *_: Any, **__: Any) -> Result:
        """Query, then rounds of train + evaluate; every round is reported as it ends."""
        num_rounds = self.cfg.rounds
        self.summary()
        first = 0 if self.evaluation_due(0, num_rounds) else 1
        first = max(first, self.completed_round + 1)
        self.round = RoundLog(first)
        self.observers.run_started(self.cfg, first, num_rounds)
        self.wait_for_nodes(grid)
        self.discover(grid, self.cfg.server.timeout_s)
        self.check_admitted(grid)
        logger.info("server state: %s", self.state.describe())
        for server_round in range(first, num_rounds + 1):
            self.round = RoundLog(server_round)
            if server_round > 0:
                self.discover(grid, self.cfg.server.timeout_s)
                self.train_round(grid, server_round)
            self.after_train(server_round)
            due = self.evaluation_due(server_round, num_rounds)
            if due and self.fuses_evaluation(server_round, num_rounds):
                self.round.close()
                self.pending = self.round  # evaluated by the next round's exchange
            else:
                if due:
                    self.evaluate_round(grid, server_round)
                self.round.close()
                self.finish_row(self.round)
            self.completed_round = server_round
            self._checkpoint(server_round, num_rounds)
        self.observers.run_finished(run_summary(self.history))
        return Result()
