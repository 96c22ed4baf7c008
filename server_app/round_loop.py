"""The round loop every method shares: a Flower `Strategy` (docs/concepts/round.md).

Flower's contract holds: `configure_train(server_round, arrays, config, grid)` returns the
train messages, `aggregate_train(server_round, replies)` turns replies into (arrays, metrics),
likewise for evaluation, and `start(grid, initial_arrays, num_rounds, timeout, ...)` runs the
rounds and returns a filled `Result`. What Flower's stock loop lacks is ours: every node gets
its own vector; nodes are queried for their key and K before they train; a round is split
into cohorts by the round schedule (`one_by_one`: one client at a time, each trained from the
hypernetwork as the one before left it); a round's evaluation can travel with the next
round's train messages; rounds are checkpointed. `configure_train` trains every registered
client on the nodes of the grid it is given: the loop hands it a view of the grid with the
cohort's nodes only.

A method is a subclass that overrides what differs, each hook with its arguments and its
results: `admit`/`register` (who joins), `configure_*` (what a message carries),
`parse_train` and `apply_train` (what a reply is, how results change the server state),
`train_round` (a round with phases of its own). Replies that are malformed are refused with
a reason (logged and kept in the round's metrics row); they never reach the server state.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from common import protocol
from common.config import DEPLOYED_IN_FLIGHT, ExperimentConfig, defining_settings
from common.seeding import seeded_share
from server_app.checkpoint import Checkpoint, CheckpointWriter
from server_app.client_directory import ClientDirectory
from server_app.defences import DeltaNormBound
from server_app.events import Observers, RunObserver
from server_app.exchange import Exchange, Posted
from server_app.round_log import (
    RoundLog,
    pending_from_state,
    pending_state,
    rejection_label,
    run_summary,
)
from server_app.schedules import Parallel, schedule_named
from server_app.server_state import (
    ClientRecord,
    ClientRegistry,
    RegistrationError,
    ServerState,
    bounded_weights,
)

logger = logging.getLogger("flwr.mh_pfedhn")
rejections = logging.getLogger("flwr.mh_pfedhn.rejected")
PER_CLIENT = "/"  # MetricRecord keys "client_accuracy/<key>": a per-client value


def deployed(grid: Grid) -> bool:
    """Whether the grid reaches SuperNodes on Flower's deployment runtime: neither Flower's
    simulation engine (InMemoryGrid) nor an in-process grid of this project (`simulated`)."""
    from flwr.superlink.grid import InMemoryGrid

    while isinstance(grid, NodesView):
        grid = grid.grid
    return not (isinstance(grid, InMemoryGrid) or getattr(grid, "simulated", False))


class RunAborted(RuntimeError):
    """The run cannot go on (too few clients admitted); the message says why, per node."""


@dataclass
class ResumePoint:
    """Where a checkpointed run stopped: the last completed round, the metrics rows so far,
    and what the Strategy itself keeps (`strategy_state`)."""

    completed_round: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    strategy: dict[str, Any] = field(default_factory=dict)


@dataclass
class Exchanged:
    """One exchange: the replies that arrived (by client key), what it cost."""

    replies: dict[str, Message]
    sent: int = 0  # messages
    seconds: float = 0.0
    bytes_down: int = 0
    timings: list[dict[str, float]] = field(default_factory=list)


@dataclass
class Sent:
    """An exchange pushed and not yet received: its messages by client key."""

    messages: dict[str, Message]
    posted: Posted
    started: float  # time.perf_counter() when pushed


@dataclass
class RoundOutcome:
    """A round's training: its metrics, its exchanges, and the evaluation of the previous
    round that travelled with it (if asked)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    exchanges: list[Exchanged] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None


def reject(server_round: int, client: str, reason: str, phase: str = "") -> None:
    """Refuse a reply of `client` (in `phase`, e.g. "global", when a round has several):
    logged, and kept in the round's row by the loop (`collecting`); the client's text is
    escaped (a forged log line cannot be made of it)."""
    client, reason = protocol.printable(client), protocol.printable(reason)
    record = {"client": client, "reason": reason} | ({"phase": phase} if phase else {})
    rejections.warning("round %d: rejected reply from %s: %s", server_round,
                       rejection_label(record), reason, extra={"rejection": record})  # fmt: skip


class _Collector(logging.Handler):
    def __init__(self, log: RoundLog) -> None:
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "rejection"):
            self.log.rejected.append(record.rejection)


@contextlib.contextmanager
def collecting(log: RoundLog) -> Iterator[None]:
    """Refusals logged while the block runs go into `log`'s row."""
    handler = _Collector(log)
    rejections.addHandler(handler)
    try:
        yield
    finally:
        rejections.removeHandler(handler)


def as_metrics(values: Mapping[str, Any]) -> MetricRecord:
    """A metrics dict as Flower's MetricRecord: per-client dicts become `name/key` entries,
    a missing value (None) is NaN."""
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, Mapping):
            flat.update({f"{name}{PER_CLIENT}{k}": v for k, v in value.items()})
        else:
            flat[name] = float("nan") if value is None else value
    return MetricRecord(flat)


def from_metrics(record: MetricRecord | None) -> dict[str, Any]:
    """The inverse of `as_metrics`; NaN comes back as None (a missing value, valid JSON)."""
    out: dict[str, Any] = {}
    for name, value in (record or {}).items():
        if isinstance(value, float) and math.isnan(value):
            value = None
        head, slash, key = name.partition(PER_CLIENT)
        if slash:
            out.setdefault(head, {})[key] = value
        else:
            out[name] = value
    return out


class NodesView(Grid):
    """A grid that shows only some of its nodes (a round's cohort); messages go through."""

    def __init__(self, grid: Grid, nodes: Iterable[int]) -> None:
        self.grid = grid
        self.nodes = set(nodes)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.grid.get_node_ids() if n in self.nodes]

    def set_run(self, run_id: int) -> None:
        self.grid.set_run(run_id)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


class RoundLoop(Strategy):
    state_class: ClassVar[type[ServerState]] = ClientRegistry  # what the server keeps

    def __init__(
        self,
        state: ServerState,
        cfg: ExperimentConfig,
        *,
        observers: Sequence[RunObserver] = (),
        checkpoints: CheckpointWriter | None = None,
        resume: ResumePoint | None = None,
    ) -> None:
        self.state = state
        self.cfg = cfg
        self.method = cfg.method_spec
        self.wire = self.method.client_class()  # the fields its clients' replies add
        self.observers = Observers(observers)
        self.checkpoints = checkpoints
        self.resume = resume or ResumePoint()
        self.directory = ClientDirectory(
            require_proof=cfg.server.require_client_proof,
            bind_node_ids=cfg.server.bind_node_ids,
            requery_rounds=cfg.server.requery_rounds,
        )
        self.delta_bound = DeltaNormBound(cfg.server.delta_norm_bound)
        self.split_sizes: dict[str, list[int]] = {}  # key -> its test (and validation) size
        self.schedule = self.make_schedule(1 if cfg.hypernetwork.in_flight == "auto" else
                                           cfg.hypernetwork.in_flight)  # fmt: skip
        self.history: list[dict[str, Any]] = []  # one row per round, as the run reports it

    def make_schedule(self, in_flight: int) -> Parallel:
        """The configured round schedule with this many clients in flight (methods without
        a schedule: one parallel cohort)."""
        if not self.method.schedules:
            return Parallel()
        hn = self.cfg.hypernetwork
        return schedule_named(hn.schedule, in_flight, hn.vjp_at)

    def choose_in_flight(self, grid: Grid) -> None:
        """`hypernetwork.in_flight: auto`: the authors' one client at a time in simulation,
        DEPLOYED_IN_FLIGHT on Flower's deployment runtime, where every idle site is time lost."""
        if self.cfg.hypernetwork.in_flight != "auto" or not self.method.schedules:
            return
        in_flight = DEPLOYED_IN_FLIGHT if deployed(grid) else 1
        self.schedule = self.make_schedule(in_flight)
        logger.info("%d client(s) in flight (hypernetwork.in_flight=auto, %s)", in_flight,
                    "deployed" if in_flight > 1 else "simulated")  # fmt: skip

    @classmethod
    def build_state(cls, cfg: ExperimentConfig) -> ServerState:
        """A fresh server state of this method."""
        return cls.state_class.from_config(cfg)

    # ------------------------------------------------------------ admission
    def admit(self, identity: protocol.Identity, server_round: int) -> ClientRecord | None:
        """Accept a client from its query reply (raise RegistrationError to refuse it;
        None: accepted, but registered later)."""
        if identity.role != "training":
            raise RegistrationError(
                f"client {identity.client_key!r} is {identity.role} but {self.cfg.method} has "
                "no generalization phase"
            )
        return self.register(identity)

    def check_room(self, identity: protocol.Identity) -> None:
        """Refuse a new key once server.max_clients keys are admitted."""
        limit = self.cfg.server.max_clients
        known = identity.client_key in self.directory.node_of
        if limit and not known and len(self.directory.node_of) >= limit:
            raise RegistrationError(f"the federation is full: {limit} clients "
                                    "(server.max_clients)")  # fmt: skip

    def register(self, identity: protocol.Identity) -> ClientRecord:
        """The registration itself; methods that need more from a client extend this."""
        return self.state.register(identity.client_key, identity.num_params)

    def log_admission(self, identity: protocol.Identity, record: ClientRecord | None) -> None:
        if record is not None:
            logger.info("client %s: K=%d", identity.client_key, record.num_params)

    def eligible(self, server_round: int, keys: list[str]) -> list[str]:
        """Which of the connected clients may train this round (all of them here)."""
        return keys

    def after_train(self, server_round: int) -> None:
        """Between a round's training and its evaluation."""

    def strategy_state(self) -> dict[str, Any]:
        """What this Strategy needs to continue after a restart (goes into the checkpoint):
        the keys' bindings (salted hashes only) and the norm bound's history."""
        return {
            "directory": self.directory.state_dict(),
            "delta_norms": self.delta_bound.state_dict(),
            "split_sizes": dict(self.split_sizes),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """The inverse of strategy_state (an empty mapping for a new run)."""
        self.directory.load_state_dict(state.get("directory", {}))
        self.delta_bound.load_state_dict(state.get("delta_norms", {}))
        self.split_sizes = {k: list(v) for k, v in state.get("split_sizes", {}).items()}

    # ---------------------------------------------------------------- nodes
    def wait_for_nodes(self, grid: Grid) -> None:
        deadline = time.monotonic() + self.cfg.server.wait_for_nodes_s
        needed = self.cfg.server.min_nodes
        while len(list(grid.get_node_ids())) < needed and time.monotonic() < deadline:
            time.sleep(1.0)
        found = len(list(grid.get_node_ids()))
        if found < needed:
            logger.warning("only %d of %d nodes connected; starting anyway", found, needed)

    def discover(self, grid: Grid, timeout: float, server_round: int = 0) -> None:
        """Query nodes never seen (new or restarted SuperNodes) for their key and K."""
        nodes = self.directory.unknown(grid.get_node_ids(), server_round)
        queries = {
            str(n): Message(protocol.instruction(None, 0), dst_node_id=n, message_type="query")
            for n in nodes
        }
        replies, _ = Exchange(grid, *self.pull_intervals).run(queries, timeout)
        identities: dict[int, protocol.Identity] = {}
        for label, reply in sorted(replies.items(), key=lambda item: int(item[0])):
            try:
                identities[int(label)] = protocol.parse_identity(reply, self.wire.reports)
            except protocol.ReplyError as err:
                self.directory.refuse(int(label), str(err), server_round)
            except Exception as err:  # noqa: BLE001 - one reply never stops the server
                logger.exception("node %s: unexpected failure on its query reply", label)
                self.directory.refuse(int(label), f"unusable reply ({type(err).__name__})",
                                      server_round)  # fmt: skip
        for node in self.admission_order(identities):
            identity = identities[node]
            try:
                self.directory.authorize(identity, node)
                self.check_room(identity)
                record = self.admit(identity, server_round)
            except (protocol.ReplyError, RegistrationError) as err:
                self.directory.refuse(node, str(err), server_round, identity.client_key)
                continue
            except Exception as err:  # noqa: BLE001 - one reply never stops the server
                logger.exception("node %d: unexpected failure on its query reply", node)
                self.directory.refuse(node, f"unusable reply ({type(err).__name__})",
                                      server_round, identity.client_key)  # fmt: skip
                continue
            self.directory.bind(identity, node)
            self.log_admission(identity, record)

    def federation_value(self, identity: protocol.Identity) -> Any:
        """What the first admitted client fixes for the whole federation (FedAvg's K, the
        size of MH-pFedHNGD's global model), or None if it fixes nothing."""
        return None

    def admission_order(self, identities: Mapping[int, protocol.Identity]) -> list[int]:
        """Nodes by id; while the federation's value is still open, those that report the
        value most of them report come first, so that no single client decides it."""
        nodes = sorted(identities)
        values = {n: self.federation_value(identities[n]) for n in nodes}
        counted = [repr(v) for v in values.values() if v is not None]
        if not counted or self.state.clients:
            return nodes
        common = max(sorted(set(counted)), key=counted.count)
        return sorted(nodes, key=lambda n: repr(values[n]) != common)

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
        """Registered clients whose node is connected, sorted."""
        live = self.directory.connected(grid.get_node_ids())
        return [k for k in live if k in self.state.clients]

    def sample(self, server_round: int, keys: list[str]) -> list[str]:
        """Seeded fraction of the eligible clients (all of them by default)."""
        return seeded_share(keys, self.cfg.server.fraction_train, self.cfg.seed, "sample",
                            server_round)  # fmt: skip

    def view(self, grid: Grid, keys: Iterable[str]) -> NodesView:
        """The grid showing only these clients' nodes."""
        return NodesView(grid, (self.directory.node_of[k] for k in keys))

    def key_of(self, message: Message) -> str:
        """The client a message goes to or came from (by its node, which the loop checks)."""
        node = message.metadata.dst_node_id if not message.metadata.reply_to_message_id \
            else message.metadata.src_node_id  # fmt: skip
        return self.directory.key_of[node]

    # ------------------------------------------------------------ messaging
    @property
    def pull_intervals(self) -> tuple[float, float]:
        """The shortest and the longest wait between pulls for replies."""
        return self.cfg.server.pull_interval_s, self.cfg.server.max_pull_interval_s

    def messages(
        self,
        message_type: str,
        server_round: int,
        config: ConfigRecord,
        grid: Grid,
        vectors: Mapping[str, np.ndarray | None] | None = None,
    ) -> list[Message]:
        """One message per registered client on the grid's nodes, each with its own vector
        (generated now unless given) and the config."""
        live = set(grid.get_node_ids())
        keys = [k for k in self.directory.connected(live) if k in self.state.clients]
        vectors = self.state.generate(keys) if vectors is None else vectors
        return [
            Message(protocol.instruction(vectors[key], server_round, dict(config)),
                    dst_node_id=self.directory.node_of[key], message_type=message_type)
            for key in keys
        ]  # fmt: skip

    def exchange(
        self, grid: Grid, messages: Iterable[Message], timeout: float, phase: str = ""
    ) -> Exchanged:
        """Send the messages; the replies that arrive in time, by client key. Error replies,
        replies from another node than the one asked, and silence are refused here."""
        return self.receive(grid, self.send(grid, messages), timeout, phase)

    def send(self, grid: Grid, messages: Iterable[Message]) -> Sent:
        """Push the messages (one exchange, collected later by `receive`)."""
        by_key = {self.key_of(m): m for m in messages}
        started = time.perf_counter()
        posted = Exchange(grid, *self.pull_intervals).post(by_key)
        return Sent(by_key, posted, started)

    def receive(self, grid: Grid, sent: Sent, timeout: float, phase: str = "") -> Exchanged:
        """The replies of a sent exchange that arrive within `timeout` of sending."""
        by_key = sent.messages
        server_round = next((protocol.read_round(m) for m in by_key.values()), 0)
        replies, missing = Exchange(grid, *self.pull_intervals).collect(sent.posted, timeout)
        timings: list[dict[str, float]] = []
        accepted = {}
        for key, reply in replies.items():
            timings.append(protocol.read_timings(reply))
            if reply.has_error():
                reason = protocol.error_text(reply)
                if self.cfg.server.stop_on_client_error:
                    who = rejection_label({"client": protocol.printable(key), "phase": phase})
                    raise RunAborted(
                        f"round {server_round}: client {who} failed, "
                        f"{protocol.printable(reason)} (server.stop_on_client_error)"
                    )
                reject(server_round, key, reason, phase)
            elif reply.metadata.src_node_id != by_key[key].metadata.dst_node_id:
                reject(server_round, key, "the reply came from another node", phase)
            else:
                accepted[key] = reply
        for key in missing:
            reject(server_round, key, "no reply before the timeout", phase)
        seconds = time.perf_counter() - sent.started if by_key else 0.0
        bytes_down = sum(_payload(m) for m in by_key.values())
        return Exchanged(accepted, len(by_key), seconds, bytes_down, [t for t in timings if t])

    def parse_all(
        self,
        server_round: int,
        replies: Iterable[Message],
        parse: Callable[[str, Message], Any],
        phase: str = "",
    ) -> dict[str, Any]:
        """parse(key, reply) for every reply; those it refuses (or fails on) are rejected
        with the reason, the others returned by client key."""
        results = {}
        for reply in replies:
            key = self.key_of(reply)
            try:
                results[key] = parse(key, reply)
            except protocol.ReplyError as err:
                reject(server_round, key, str(err), phase)
            except Exception as err:  # noqa: BLE001 - one reply never stops the server
                logger.exception(
                    "%s: unexpected failure on its reply",
                    rejection_label({"client": key, "phase": phase}),
                )
                reject(server_round, key, f"unusable reply ({type(err).__name__})", phase)
        return results

    def global_arrays(self) -> ArrayRecord:
        """The federation's shared parameters after the last aggregation (Flower's `arrays`;
        none here: every client's vector is its own)."""
        return ArrayRecord()

    # --------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """A train message for every registered client on `grid`'s nodes."""
        return self.messages(protocol.TRAIN, server_round, config, grid)

    def parse_train(self, key: str, reply: Message) -> protocol.TrainResult:
        size = self.state.clients[key].num_params
        limit = self.cfg.server.max_delta_abs
        return protocol.parse_train_reply(reply, size, limit, self.wire.returns)

    def bounded(
        self, server_round: int, key: str, result: protocol.TrainResult
    ) -> tuple[protocol.TrainResult, bool]:
        """The delta within server.delta_norm_bound (called in the round's seeded order);
        whether it was scaled down."""
        delta, scaled = self.delta_bound(result.delta)
        if not scaled:
            return result, False
        logger.warning("round %d: the delta of %s was scaled down to the norm bound",
                       server_round, key)  # fmt: skip
        return dataclasses.replace(result, delta=delta), True

    def weights(self, results: Mapping[str, protocol.TrainResult]) -> dict[str, float]:
        """Example counts, each bounded by server.max_example_weight x the round's median."""
        counts = {k: r.num_examples for k, r in results.items()}
        return bounded_weights(counts, self.cfg.server.max_example_weight)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Parse every reply (refusing malformed ones), bound the deltas, hand the results to
        `apply_train`; the shared arrays and the cohort's metrics."""
        results = self.parse_all(server_round, replies, self.parse_train)
        scaled = 0
        for key in sorted(results):  # bounded in key order, not arrival order
            results[key], was_scaled = self.bounded(server_round, key, results.pop(key))
            scaled += was_scaled
        started = time.perf_counter()
        refused = self.apply_train(server_round, results)
        update_s = time.perf_counter() - started
        for key, reason in refused.items():
            reject(server_round, key, reason)
        applied = {k: r for k, r in results.items() if k not in refused}
        metrics = self.train_metrics(applied, update_s)
        metrics["bytes_up"] = sum(r.bytes_up for r in results.values())  # as they travelled
        if scaled:
            metrics["deltas_scaled"] = scaled
        return self.global_arrays(), as_metrics(metrics)

    def apply_train(
        self, server_round: int, results: Mapping[str, protocol.TrainResult]
    ) -> dict[str, str]:
        """How a cohort's results change the server state; returns the clients refused, with
        why (their update could not be applied). Nothing changes here."""
        return {}

    def mean_loss(self, results: Mapping[str, protocol.TrainResult]) -> float:
        """The example-weighted mean train loss (weights bounded as `weights`); NaN for none."""
        if len(results) == 1:  # the mean of one loss is that loss, exactly
            return next(iter(results.values())).train_loss
        weights = self.weights(results)
        examples = sum(weights.values())
        total = sum(r.train_loss * weights[k] for k, r in results.items())
        return total / examples if examples else float("nan")

    def train_metrics(
        self, results: Mapping[str, protocol.TrainResult], update_s: float
    ) -> dict[str, Any]:
        """clients_trained, the example-weighted train loss, the examples it weighs, bytes
        sent up and the server's time."""
        loss = self.mean_loss(results)
        return {
            "clients_trained": len(results),
            "train_loss": loss,
            "num_examples": sum(r.num_examples for r in results.values()),
            "server_update_seconds": update_s,
        }

    def train_round(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        timeout: float,
        evaluate_previous: bool,
    ) -> RoundOutcome:
        """The sampled clients train, cohort by cohort as the schedule says, with up to
        `schedule.in_flight` cohorts sent before the first of them is received: cohort j is
        configured (its vectors generated) once cohort j - in_flight is applied, and cohorts
        are applied in the schedule's order whatever the order their replies arrive in, so
        no applied delta is older than in_flight - 1 steps and a deployed run takes the steps
        a simulated one takes. With `evaluate_previous` (the previous round's evaluation is
        due and nothing changed since), the first exchange also carries it: training clients
        evaluate what they receive before training, idle ones get an evaluate message."""
        clients = self.sample(
            server_round, self.eligible(server_round, self.connected_clients(grid))
        )
        planned = list(self.schedule.cohorts(self.state.seed, clients, server_round))
        outcome = RoundOutcome()
        cohorts: list[dict[str, Any]] = []
        open_: collections.deque[Sent] = collections.deque()
        peak_in_flight = 0

        def send_next() -> None:
            nonlocal peak_in_flight
            index = len(outcome.exchanges) + len(open_)
            cohort = planned[index]
            train_config = ConfigRecord(dict(config))
            extra: list[Message] = []
            if evaluate_previous and index == 0:
                train_config[protocol.EVALUATE_FIRST] = True
                idle = [k for k in self.connected_clients(grid) if k not in cohort]
                extra = list(self.configure_evaluate(server_round, arrays, ConfigRecord(),
                                                     self.view(grid, idle)))  # fmt: skip
            train = list(self.configure_train(server_round, arrays, train_config,
                                              self.view(grid, cohort)))  # fmt: skip
            open_.append(self.send(grid, train + extra))
            peak_in_flight = max(peak_in_flight, sum(_training(s) for s in open_))

        while len(outcome.exchanges) + len(open_) < len(planned):
            if len(open_) == self.schedule.in_flight:
                self.apply_exchange(grid, server_round, open_.popleft(), timeout, outcome,
                                    cohorts, evaluate_previous)  # fmt: skip
            send_next()
        while open_:
            self.apply_exchange(grid, server_round, open_.popleft(), timeout, outcome, cohorts,
                                evaluate_previous)  # fmt: skip
        outcome.metrics = self.combine(cohorts)
        if planned:
            outcome.metrics["clients_in_flight"] = peak_in_flight
        return outcome

    def apply_exchange(
        self,
        grid: Grid,
        server_round: int,
        sent: Sent,
        timeout: float,
        outcome: RoundOutcome,
        cohorts: list[dict[str, Any]],
        evaluate_previous: bool,
    ) -> None:
        """Receive a cohort's replies and apply its training (and the evaluation the first
        exchange carries); its metrics go into `cohorts`."""
        exchanged = self.receive(grid, sent, timeout)
        outcome.exchanges.append(exchanged)
        trained = [r for r in exchanged.replies.values()
                   if r.metadata.message_type == protocol.TRAIN]  # fmt: skip
        _, metrics = self.aggregate_train(server_round, trained)  # `arrays` stay the round's
        cohorts.append(from_metrics(metrics))
        if evaluate_previous and len(outcome.exchanges) == 1:
            evaluation = self.aggregate_evaluate(server_round, exchanged.replies.values())
            outcome.evaluation = from_metrics(evaluation)

    def combine(self, cohorts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """A round's train metrics from its cohorts': counts add up, the train loss is the
        example-weighted mean of the cohorts' (each weighing at most server.max_example_weight
        times the median), in the cohorts' order."""
        if len(cohorts) == 1:
            out = dict(cohorts[0])
        else:
            trained = [c for c in cohorts if c.get("clients_trained")]
            counts = {str(i): c["num_examples"] for i, c in enumerate(trained)}
            weights = bounded_weights(counts, self.cfg.server.max_example_weight)
            total = sum(weights.values())
            loss = sum(c["train_loss"] * weights[str(i)] for i, c in enumerate(trained))
            out = {"train_loss": loss / total if total else float("nan")}
            for name in ("clients_trained", "num_examples", "bytes_up", "server_update_seconds",
                         "deltas_scaled"):  # fmt: skip
                values = [c[name] for c in cohorts if name in c]
                if values:
                    out[name] = sum(values)
        out.pop("num_examples", None)
        seconds = out.pop("server_update_seconds", 0.0)
        clients = out.get("clients_trained", 0)
        out.update(
            server_update_seconds=seconds,
            server_seconds_per_client_update=seconds / clients if clients else 0.0,
        )
        return out

    # ------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """An evaluate message for every registered client on `grid`'s nodes."""
        return self.messages(protocol.EVALUATE, server_round, config, grid)

    def parse_evaluate(self, key: str, reply: Message) -> protocol.EvalResult:
        """An evaluate reply, or the evaluation a train reply carries; its counts must be
        those the client reported the first time (its test and validation splits do not
        change), so a client cannot claim more examples to weigh more."""
        if reply.metadata.message_type == protocol.TRAIN:
            evaluation = protocol.parse_fused_evaluation(reply)
            if evaluation is None:
                raise protocol.ReplyError("the train reply carries no evaluation")
        else:
            evaluation = protocol.parse_evaluate_reply(reply)
        validation = evaluation.validation
        sizes = [evaluation.num_examples, 0 if validation is None else validation.num_examples]
        known = self.split_sizes.setdefault(key, sizes)
        if known != sizes:
            raise protocol.ReplyError(f"evaluation counts {sizes} differ from the {known} this "
                                      "client reported first")  # fmt: skip
        return evaluation

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Pooled and per-client accuracy of the replies that parse (others are refused)."""
        results = self.parse_all(server_round, replies, self.parse_evaluate)
        stats = self.evaluation_stats({k: results[k] for k in sorted(results)})
        return None if stats is None else as_metrics(stats)

    def evaluation_stats(self, results: Mapping[str, protocol.EvalResult]) -> dict[str, Any] | None:
        """Pooled (total correct / total samples) and per-client accuracy, pooled loss; the
        same pooled on validation splits, where clients hold one."""
        accuracy, loss = self.pooled(results)
        if accuracy is None:
            return None
        per_client = {  # a client with no test samples has no accuracy of its own
            k: r.correct / r.num_examples for k, r in sorted(results.items()) if r.num_examples
        }
        stats = {
            "accuracy": accuracy,
            "accuracy_client_mean": float(np.mean(list(per_client.values()))),
            "loss": loss,
            "clients_evaluated": len(results),
            "client_accuracy": per_client,
        }
        held_out = {k: r.validation for k, r in results.items() if r.validation is not None}
        val_accuracy, val_loss = self.pooled(held_out)
        if val_accuracy is not None:  # pooled over the clients that hold a validation split
            stats["val_accuracy"], stats["val_loss"] = val_accuracy, val_loss
        return stats

    def pooled(
        self, results: Mapping[str, protocol.EvalResult]
    ) -> tuple[float | None, float | None]:
        """Pooled accuracy and loss (total correct / total examples): each client's count
        weighs at most server.max_example_weight x the lower median, like a training
        weight, so no client can carry the pool by claiming many examples."""
        counts = {k: r.num_examples for k, r in results.items()}
        total = sum(counts.values())
        if not total:
            return None, None
        weights = bounded_weights(counts, self.cfg.server.max_example_weight)
        if all(weights[k] == counts[k] for k in counts):  # nobody over the bound
            return (sum(r.correct for r in results.values()) / total,
                    sum(r.loss_sum for r in results.values()) / total)  # fmt: skip
        scale = {k: weights[k] / counts[k] for k in counts if counts[k]}
        bounded = sum(weights[k] for k in scale)
        return (sum(results[k].correct * s for k, s in scale.items()) / bounded,
                sum(results[k].loss_sum * s for k, s in scale.items()) / bounded)  # fmt: skip

    def evaluate_round(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
        timeout: float,
    ) -> tuple[dict[str, Any], list[Exchanged]]:  # fmt: skip
        """Every connected client evaluates its vector: (metrics, the exchanges)."""
        view = self.view(grid, self.connected_clients(grid))
        exchanged = self.exchange(grid, self.configure_evaluate(server_round, arrays, config,
                                                                view), timeout)  # fmt: skip
        metrics = self.aggregate_evaluate(server_round, exchanged.replies.values())
        return from_metrics(metrics), [exchanged]

    # ---------------------------------------------------------------- loop
    def summary(self) -> None:
        c = self.cfg
        logger.info(
            "%s: %d rounds, %s, seed %d; data %s (%s), models %s, unless a site's node config "
            "sets its own (each client's K is logged as it registers)",
            c.method,
            c.rounds,
            f"{c.hypernetwork.schedule} schedule" if self.method.schedules else "parallel rounds",
            c.seed,
            c.data.source,
            c.data.partitioner,
            ",".join(c.clients.models),
        )

    def fuses_evaluation(self, server_round: int, num_rounds: int) -> bool:
        """Whether this round's evaluation can travel with the next round's train messages:
        they carry exactly the vectors an evaluate message would (nothing changes in between)."""
        return (
            self.cfg.server.fuse_evaluation
            and server_round < num_rounds
            and self.schedule.one_exchange
        )

    def evaluation_due(self, server_round: int, num_rounds: int) -> bool:
        every = self.cfg.server.evaluate_every
        if every == 0:
            return False
        join = self.cfg.generalization.join_round
        return server_round in (0, num_rounds, join) or server_round % every == 0

    def checkpoint(self, server_round: int, num_rounds: int, pending: RoundLog | None) -> None:
        every = self.cfg.server.checkpoint_every
        if self.checkpoints is None or every == 0:
            return
        if server_round % every == 0 or server_round == num_rounds:
            strategy = {**self.strategy_state(), "pending_round": pending_state(pending)}
            checkpoint = Checkpoint(self.state, server_round, self.history, strategy,
                                    defining_settings(self.cfg))  # fmt: skip
            self.checkpoints.save(checkpoint)
            self.observers.checkpoint_saved(server_round, self.checkpoints.path)

    def finish_row(self, log: RoundLog, result: Result, num_rounds: int) -> None:
        row = log.row()
        self.history.append(row)
        self.observers.round_finished(row, num_rounds)
        round_metrics = {k: v for k, v in row.items() if k not in ("rejected", "round")}
        result.evaluate_metrics_clientapp[log.round] = as_metrics(
            {k: v for k, v in round_metrics.items() if isinstance(v, (int, float, dict))}
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Any = None,
    ) -> Result:
        """Query, then rounds of train + evaluate; every round is reported as it ends.
        num_rounds and timeout default to the experiment's rounds and server.timeout_s;
        `initial_arrays` are the shared parameters to start from (FedAvg's w_0), where the
        method has any; `evaluate_fn(round, arrays)` is called after each round as in
        Flower's loop, its metrics kept in the Result and the row (`server_` prefix)."""
        num_rounds = self.cfg.rounds if num_rounds is None else num_rounds
        timeout = self.cfg.server.timeout_s if timeout is None else timeout
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        resume = self.resume
        if resume.completed_round >= 0:  # continuing a checkpointed run
            self.restore(resume.strategy)
            self.history = list(resume.history)
        if initial_arrays is not None and resume.completed_round < 0:
            self.set_initial_arrays(initial_arrays)
        pending = pending_from_state(resume.strategy.get("pending_round"))
        result = Result()
        self.choose_in_flight(grid)
        self.summary()
        first = 0 if self.evaluation_due(0, num_rounds) else 1
        first = max(first, resume.completed_round + 1)
        self.observers.run_started(self.cfg, first, num_rounds)
        self.wait_for_nodes(grid)
        self.discover(grid, timeout, first)  # refusals go to the directory, not a round's row
        self.check_admitted(grid)
        logger.info("server state: %s", self.state.describe())
        for server_round in range(first, num_rounds + 1):
            log = RoundLog(server_round)
            arrays = self.global_arrays()
            with collecting(log):
                if server_round > 0:
                    self.discover(grid, timeout, server_round)
                    outcome = self.train_round(grid, server_round, arrays, train_config, timeout,
                                               evaluate_previous=pending is not None)  # fmt: skip
                    log.absorb(outcome.metrics, outcome.exchanges)
                    result.train_metrics_clientapp[server_round] = as_metrics(outcome.metrics)
                    if pending is not None:
                        pending.values.update(outcome.evaluation or {})
                        self.finish_row(pending, result, num_rounds)
                        pending = None
                self.after_train(server_round)
                due = self.evaluation_due(server_round, num_rounds)
                if due and self.fuses_evaluation(server_round, num_rounds):
                    pending = log  # evaluated by the next round's first exchange
                elif due:
                    metrics, exchanges = self.evaluate_round(
                        grid, server_round, self.global_arrays(), evaluate_config, timeout
                    )
                    log.absorb(metrics, exchanges)
            if evaluate_fn is not None:
                server_metrics = evaluate_fn(server_round, self.global_arrays())
                if server_metrics is not None:
                    result.evaluate_metrics_serverapp[server_round] = server_metrics
                    log.values.update({f"server_{k}": v for k, v in server_metrics.items()})
            log.close()
            if pending is not log:
                self.finish_row(log, result, num_rounds)
            self.checkpoint(server_round, num_rounds, pending)
        summary = run_summary(self.history)
        if unadmitted := self.directory.unadmitted():
            summary["unadmitted_nodes"] = unadmitted
        self.observers.run_finished(summary)
        result.arrays = self.final_arrays()
        return result

    def set_initial_arrays(self, arrays: ArrayRecord) -> None:
        """Start from these shared parameters (a method without any refuses them)."""
        if len(arrays):
            raise ValueError(f"{self.cfg.method} keeps no shared parameters to start from")

    def final_arrays(self) -> ArrayRecord:
        """What the run learned, as the Result's arrays: the shared parameters, if any."""
        return self.global_arrays()


def _training(sent: Sent) -> int:
    """How many of an exchange's messages are train messages."""
    return sum(m.metadata.message_type == protocol.TRAIN for m in sent.messages.values())


def _payload(message: Message) -> int:
    """Bytes of the arrays a message carries (from their declared shapes: nothing decoded)."""
    if "arrays" not in message.content:
        return 0
    return sum(
        np.dtype(a.dtype).itemsize * math.prod(a.shape) for a in message.content["arrays"].values()
    )
