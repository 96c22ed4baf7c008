"""The MH-pFedHN Strategy on Flower's Message API.

Flower's stock strategies send one global model to everyone; here every node gets its own
generated vector, so the round loop is ours (`start`), built from the usual
configure/aggregate pieces. Each round: query nodes not seen before (K and client key),
send each sampled client theta_i, apply the valid deltas to the hypernetwork, then send every
known client its regenerated theta_i for evaluation on its own test split.
Replies that are malformed are logged and dropped; they never reach the server state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from common import protocol
from common.config import ExperimentConfig
from common.seeding import stable_seed
from server_app.checkpoint import CHECKPOINT_NAME, save_checkpoint
from server_app.outputs import RunRecorder
from server_app.state import (
    ClientRecord,
    HypernetworkServer,
    RegistrationError,
    validate_num_params,
)

logger = logging.getLogger("flwr.mh_pfedhn")


@dataclass
class RoundLog:
    """What one round measured; becomes a line of metrics.jsonl."""

    round: int
    started: float = field(default_factory=time.perf_counter)
    bytes_down: int = 0
    bytes_up: int = 0
    values: dict[str, Any] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)

    def reject(self, who: str, reason: str) -> None:
        logger.warning("round %d: rejected reply from %s: %s", self.round, who, reason)
        self.rejected.append({"client": who, "reason": reason})


class MHpFedHN(Strategy):
    def __init__(
        self,
        server: HypernetworkServer,
        cfg: ExperimentConfig,
        recorder: RunRecorder | None = None,
    ) -> None:
        self.server = server
        self.cfg = cfg
        self.recorder = recorder
        self.node_of: dict[str, int] = {}  # client key -> latest node id
        self.key_of: dict[int, str] = {}  # node id -> client key
        self.refused: dict[int, str] = {}  # node id -> why it was refused
        self.history: list[dict[str, Any]] = []
        self.roles: dict[str, str] = {}  # client key -> "training" | "novel"
        self.waiting: dict[str, protocol.Identity] = {}  # novel clients not yet joined
        self.current_round = 0
        self.completed_round = -1  # set when resuming from a checkpoint
        self._pending: list[tuple[Message, str]] = []
        self._sent_vectors: dict[str, np.ndarray] = {}
        self._sampled: tuple[int, list[str]] = (-1, [])
        self._log = RoundLog(0)

    # ------------------------------------------------------------------ nodes
    def wait_for_nodes(self, grid: Grid) -> None:
        deadline = time.monotonic() + self.cfg.server.wait_for_nodes_s
        needed = self.cfg.server.min_nodes
        while len(list(grid.get_node_ids())) < needed and time.monotonic() < deadline:
            time.sleep(1.0)
        found = len(list(grid.get_node_ids()))
        if found < needed:
            logger.warning("only %d of %d nodes connected; starting anyway", found, needed)

    def discover(self, grid: Grid, timeout: float) -> None:
        """Query nodes never seen (new or restarted SuperNodes) for their key and K."""
        new = [n for n in grid.get_node_ids() if n not in self.key_of and n not in self.refused]
        if not new:
            return
        messages = [
            Message(protocol.instruction(None, 0), dst_node_id=n, message_type=protocol.QUERY)
            for n in new
        ]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        node_of_message = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        for reply in replies:
            node = node_of_message.get(reply.metadata.reply_to_message_id)
            if node is None:
                continue
            try:
                identity = protocol.parse_identity(reply)
                record = self.admit_or_hold(identity)
            except (protocol.ReplyError, RegistrationError) as err:
                self.refused[node] = str(err)
                logger.warning("node %d refused: %s", node, err)
                continue
            key = identity.client_key
            old = self.node_of.get(key)
            if old is not None and old != node:
                self.key_of.pop(old, None)
                logger.info("client %s is back on node %d (was %d)", key, node, old)
            self.node_of[key] = node
            self.key_of[node] = key
            if record is None:
                logger.info("client %s: novel, joins after round %d", key, self.join_round)
            else:
                logger.info("client %s: K=%d, tau=%d%s", key, record.num_params, record.tau,
                            " (novel)" if self.roles[key] == "novel" else "")  # fmt: skip

    # --------------------------------------------------- novel clients (paper 4.4)
    @property
    def join_round(self) -> int:
        return self.cfg.generalization.join_round

    def generalizing(self, server_round: int) -> bool:
        """After the join round only novel clients train, on a frozen hypernetwork."""
        return 0 < self.join_round < server_round

    def admit_or_hold(self, identity: protocol.Identity) -> ClientRecord | None:
        """Register a training client now; hold a novel one until the join (None).

        A client first seen after the join is novel whatever it reports; a known key keeps
        the role it had.
        """
        key = identity.client_key
        role = self.roles.get(key) or (
            "novel" if self.generalizing(self.current_round) else identity.role
        )
        if role == "novel" and not self.join_round:
            raise RegistrationError(
                f"client {key!r} is novel but this run has no generalization phase "
                "(set generalization.join_round)"
            )
        if role == "novel" and not self.generalizing(self.current_round):
            validate_num_params(identity.num_params, self.server.settings.max_params)
            self.roles[key] = role
            self.waiting[key] = identity
            return None
        record = self.admit(identity)
        self.roles[key] = role
        return record

    def join_novel_clients(self) -> None:
        """The end of training: freeze the hypernetwork, then register the novel clients
        (their embeddings, and heads for taus never seen, are created trainable)."""
        self.server.freeze(self.cfg.generalization.embedding_lr)
        for key, identity in sorted(self.waiting.items()):
            try:
                record = self.admit(identity)
            except RegistrationError as err:
                self._log.reject(key, str(err))
                continue
            new_head = record.tau not in self.server.frozen.heads
            logger.info("novel client %s joins: K=%d, tau=%d%s", key, record.num_params,
                        record.tau, " (new head)" if new_head else "")  # fmt: skip
        self.waiting.clear()
        logger.info("hypernetwork frozen after round %d: %s", self.join_round,
                    self.server.describe())  # fmt: skip

    def admit(self, identity: protocol.Identity) -> ClientRecord:
        """Register a client from its query reply (raises RegistrationError to refuse it)."""
        return self.server.register(identity.client_key, identity.num_params)

    def connected_clients(self, grid: Grid) -> list[str]:
        """Registered clients whose node is connected (novel ones only once they joined)."""
        live = set(grid.get_node_ids())
        return sorted(k for k, n in self.node_of.items() if n in live and k in self.server.clients)

    def sample(self, server_round: int, keys: list[str]) -> list[str]:
        """Seeded fraction of the connected clients (all of them by default)."""
        fraction = self.cfg.server.fraction_train
        if fraction >= 1.0 or not keys:
            return keys
        count = max(1, int(round(fraction * len(keys))))
        rng = np.random.default_rng(stable_seed(self.cfg.seed, "sample", server_round))
        return sorted(keys[i] for i in rng.choice(len(keys), count, replace=False))

    # ------------------------------------------------------------- messaging
    def _messages(
        self,
        keys: list[str],
        message_type: str,
        server_round: int,
        vectors: dict[str, np.ndarray] | None = None,
    ) -> list[Message]:
        """One message per client with its own vector (generated now unless given)."""
        vectors = self.server.generate(keys) if vectors is None else vectors
        self._sent_vectors = vectors
        self._pending = []
        for key in keys:
            config, teacher = self.instruction_extras(message_type, key)
            content = protocol.instruction(vectors[key], server_round, config, teacher)
            for array in (vectors[key], teacher):
                self._log.bytes_down += 0 if array is None else array.nbytes
            message = Message(content, dst_node_id=self.node_of[key], message_type=message_type)
            self._pending.append((message, key))
        return [m for m, _ in self._pending]

    def instruction_extras(self, message_type: str, key: str) -> tuple[dict, np.ndarray | None]:
        """Extra config and teacher vector for a client's message (none in MH-pFedHN)."""
        return {}, None

    def _by_client(self, replies: Iterable[Message]) -> dict[str, Message]:
        """Map replies to client keys via the ids of the messages they answer."""
        sent = {m.metadata.message_id: key for m, key in self._pending}
        out: dict[str, Message] = {}
        for reply in replies:
            key = sent.get(reply.metadata.reply_to_message_id)
            if key is None:
                self._log.reject(f"node {reply.metadata.src_node_id}", "reply to no sent message")
            else:
                out[key] = reply
        for key in sorted(set(sent.values()) - set(out)):
            self._log.reject(key, "no reply before the timeout")
        return out

    def round_clients(self, server_round: int, grid: Grid) -> list[str]:
        """The clients sampled for this round (drawn once per round, seeded)."""
        if self._sampled[0] != server_round:
            role = "novel" if self.generalizing(server_round) else "training"
            keys = [k for k in self.connected_clients(grid) if self.roles.get(k) == role]
            self._sampled = (server_round, self.sample(server_round, keys))
        return self._sampled[1]

    def parse_replies(
        self, replies: Iterable[Message], parse: Callable[[str, Message], Any], phase: str = ""
    ) -> dict[str, Any]:
        """parse(key, reply) for each client's reply; refused ones are logged and left out.

        bytes_up counts the deltas of accepted replies as they travelled (sparse when top-p).
        """
        results = {}
        for key, reply in self._by_client(replies).items():
            try:
                results[key] = parse(key, reply)
            except protocol.ReplyError as err:
                self._log.reject(f"{key}{phase}", str(err))
                continue
            self._log.bytes_up += getattr(results[key], "bytes_up", 0)
        return results

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._messages(self.round_clients(server_round, grid), protocol.TRAIN, server_round)

    def _parse_train(self, replies: Iterable[Message]) -> dict[str, protocol.TrainResult]:
        return self.parse_replies(
            replies,
            lambda key, r: protocol.parse_train_reply(r, self.server.record(key).num_params),
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        results = self._parse_train(replies)
        started = time.perf_counter()
        self.server.apply_deltas(
            {k: r.delta for k, r in results.items()},
            server_round,
            weights={k: r.num_examples for k, r in results.items()},
            sent={k: self._sent_vectors[k] for k in results},
        )
        return self._train_metrics(results, time.perf_counter() - started)

    def train_one_by_one(self, grid: Grid, server_round: int, timeout: float) -> MetricRecord:
        """The authors' round: for each client in a seeded order, generate its theta from the
        hypernetwork as it is now, let it train, step, and only then go on to the next."""
        keys = self.round_clients(server_round, grid)
        results: dict[str, protocol.TrainResult] = {}
        update_s = 0.0
        for key in self.server.update_order(keys, server_round):
            messages = self._messages([key], protocol.TRAIN, server_round)
            reply = self._parse_train(self._exchange(grid, messages, timeout))
            if key in reply:
                started = time.perf_counter()
                self.server.step_client(key, reply[key].delta)
                update_s += time.perf_counter() - started
                results[key] = reply[key]
        return self._train_metrics(results, update_s)[1]

    def _train_metrics(
        self, results: dict[str, protocol.TrainResult], update_s: float
    ) -> tuple[None, MetricRecord]:
        examples = sum(r.num_examples for r in results.values())
        train_loss = (
            sum(r.train_loss * r.num_examples for r in results.values()) / examples
            if examples
            else float("nan")
        )
        self._log.values.update(
            clients_trained=len(results),
            train_loss=train_loss,
            server_update_seconds=update_s,
            server_seconds_per_client_update=update_s / len(results) if results else 0.0,
        )
        return None, MetricRecord(
            {"clients-trained": len(results), "train-loss": train_loss, "update-s": update_s}
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._messages(self.connected_clients(grid), protocol.EVALUATE, server_round)

    def evaluation_stats(self, replies: Iterable[Message]) -> dict[str, Any] | None:
        """Pooled (total correct / total samples) and per-client accuracy, pooled loss."""
        results = self.parse_replies(replies, lambda key, r: protocol.parse_evaluate_reply(r))
        total = sum(r.num_examples for r in results.values())
        if not total:
            return None
        per_client = {k: r.correct / r.num_examples for k, r in sorted(results.items())}
        stats = {
            "accuracy": sum(r.correct for r in results.values()) / total,
            "accuracy_client_mean": float(np.mean(list(per_client.values()))),
            "loss": sum(r.loss_sum for r in results.values()) / total,
            "clients_evaluated": len(results),
            "client_accuracy": per_client,
        }
        if self.join_round:
            for role in ("training", "novel"):
                group = [r for k, r in results.items() if self.roles.get(k) == role]
                n = sum(r.num_examples for r in group)
                stats[f"{role}_accuracy"] = sum(r.correct for r in group) / n if n else None
                stats[f"{role}_clients"] = len(group)
        return stats

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        stats = self.evaluation_stats(replies)
        if stats is None:
            return None
        self._log.values.update(stats)
        return MetricRecord(
            {
                "accuracy": stats["accuracy"],
                "accuracy-client-mean": stats["accuracy_client_mean"],
                "loss": stats["loss"],
            }
        )

    def summary(self) -> None:
        c = self.cfg
        logger.info(
            "%s: %d rounds, %s schedule, data %s (%s), models %s, seed %d",
            c.method,
            c.rounds,
            c.hypernetwork.schedule,
            c.data.source,
            c.data.partitioner,
            ",".join(c.clients.models),
            c.seed,
        )

    # ------------------------------------------------------------------ loop
    def _exchange(self, grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
        return list(grid.send_and_receive(list(messages), timeout=timeout))

    def train_round(self, grid: Grid, server_round: int, timeout: float) -> MetricRecord | None:
        one_by_one = self.cfg.hypernetwork.schedule == "one_by_one"
        if one_by_one and hasattr(self.server, "step_client"):  # Local, FedAvg: always parallel
            return self.train_one_by_one(grid, server_round, timeout)
        messages = self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
        replies = self._exchange(grid, messages, timeout)
        return self.aggregate_train(server_round, replies)[1]

    def evaluate_round(self, grid: Grid, server_round: int, timeout: float) -> MetricRecord | None:
        messages = self.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid)
        return self.aggregate_evaluate(server_round, self._exchange(grid, messages, timeout))

    def _evaluation_due(self, server_round: int, num_rounds: int) -> bool:
        every = self.cfg.server.evaluate_every
        if every == 0:
            return False
        return server_round in (0, num_rounds, self.join_round) or server_round % every == 0

    def _finish_round(self) -> dict[str, Any]:
        log = self._log
        row: dict[str, Any] = {"round": log.round}
        for key in ("accuracy", "accuracy_client_mean", "loss"):
            row[key] = log.values.pop(key, None)
        row["seconds"] = time.perf_counter() - log.started
        row["bytes_down"] = log.bytes_down
        row["bytes_up"] = log.bytes_up
        row.update(log.values)
        row["rejected"] = log.rejected
        self.history.append(row)
        if self.recorder is not None:
            self.recorder.log_round(row)
        return row

    def _checkpoint(self, server_round: int, num_rounds: int) -> None:
        every = self.cfg.server.checkpoint_every
        if self.recorder is None or every == 0:
            return
        if server_round % every == 0 or server_round == num_rounds:
            path = self.recorder.directory / CHECKPOINT_NAME
            save_checkpoint(path, self.server, server_round, self.history)

    def _print_progress(self, row: dict[str, Any], num_rounds: int) -> None:
        acc = row["accuracy"]
        acc_text = "n/a" if acc is None else f"{acc:.4f}"
        mean = row["accuracy_client_mean"]
        mean_text = "" if mean is None else f" (client mean {mean:.4f})"
        if row.get("global_accuracy") is not None:
            mean_text += f" | global model {row['global_accuracy']:.4f}"
        for role in ("novel", "training"):
            if row.get(f"{role}_accuracy") is not None:
                mean_text += f" | {role} {row[f'{role}_accuracy']:.4f}"
        logger.info(
            "[round %d/%d] accuracy %s%s | loss %s | %.1f s | down %.2f MB up %.2f MB%s",
            row["round"],
            num_rounds,
            acc_text,
            mean_text,
            "n/a" if row["loss"] is None else f"{row['loss']:.4f}",
            row["seconds"],
            row["bytes_down"] / 1e6,
            row["bytes_up"] / 1e6,
            f" | {len(row['rejected'])} rejected" if row["rejected"] else "",
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn=None,
    ) -> Result:
        """Query, then rounds of train + evaluate; every round is logged as it ends."""
        num_rounds = self.cfg.rounds if num_rounds is None else num_rounds
        timeout = self.cfg.server.timeout_s if timeout is None else timeout
        self.summary()
        result = Result()
        first = 0 if self._evaluation_due(0, num_rounds) else 1
        first = max(first, self.completed_round + 1)
        self.current_round = first
        self.wait_for_nodes(grid)
        self.discover(grid, timeout)
        logger.info("server state: %s", self.server.describe())
        for server_round in range(first, num_rounds + 1):
            self._log = RoundLog(server_round)
            self.current_round = server_round
            if server_round > 0:
                self.discover(grid, timeout)
                result.train_metrics_clientapp[server_round] = self.train_round(
                    grid, server_round, timeout
                )
            if self.join_round and server_round == self.join_round:
                self.join_novel_clients()
            if self._evaluation_due(server_round, num_rounds):
                eval_metrics = self.evaluate_round(grid, server_round, timeout)
                if eval_metrics is not None:
                    result.evaluate_metrics_clientapp[server_round] = eval_metrics
            self._print_progress(self._finish_round(), num_rounds)
            self._checkpoint(server_round, num_rounds)
        if self.recorder is not None:
            self.recorder.write_summary(run_summary(self.history))
            self.recorder.write_plot()
        return result


def run_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and best pooled accuracy, each labelled with its round (SPEC section 7)."""
    evaluated = [r for r in history if r.get("accuracy") is not None]
    summary: dict[str, Any] = {
        "rounds": max((r["round"] for r in history), default=0),
        "total_seconds": sum(r["seconds"] for r in history),
        "total_bytes_down": sum(r["bytes_down"] for r in history),
        "total_bytes_up": sum(r["bytes_up"] for r in history),
    }
    if evaluated:
        final = evaluated[-1]
        best = max(evaluated, key=lambda r: r["accuracy"])
        summary.update(
            final_accuracy=final["accuracy"],
            final_round=final["round"],
            final_accuracy_client_mean=final["accuracy_client_mean"],
            best_accuracy=best["accuracy"],
            best_round=best["round"],
            best_selected_by="highest pooled test accuracy over rounds (as the authors' code)",
        )
    return summary
