"""A server that no client can crash, poison, exhaust or impersonate (README, "Threat model").

Each test is one attack seen against the previous server, played by a scripted ClientApp next
to honest ones through the in-process grid; the server must survive, refuse, and keep its
state (and the honest clients' state) as if the attacker had not answered.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.spec import NodeConfigError, client_spec
from client_app.store import folder_name
from common import protocol
from common.config import ConfigError, resolve_config
from server_app.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from server_app.defences import DeltaNormBound
from server_app.hypernetwork_server import HypernetworkServer, HypernetworkSettings
from server_app.round_loop import RunAborted
from server_app.run import build_strategy, run_experiment
from server_app.server_state import RegistrationError, bounded_weights
from simulation.grid import InProcessGrid
from tests.test_strategy import SMALL, proof_of

SIZE = 40


def honest_delta(theta: np.ndarray) -> np.ndarray:
    return (0.01 * theta + 0.001).astype(np.float32)


def app_with(train=None, query=None, evaluate=None) -> ClientApp:
    """Clients c0, c1, ... answer honestly unless train/query/evaluate(i, msg) returns a
    RecordDict (or raises) for client i."""
    app = ClientApp()

    def who(context) -> int:
        return int(context.node_config["partition-id"])

    def key(context) -> str:
        return str(context.node_config.get("client-key", f"c{who(context)}"))

    @app.query()
    def _query(msg, context):
        content = query(who(context), msg) if query else None
        if content is None:
            content = protocol.identity_reply(key(context), SIZE, proof=proof_of(key(context)))
        return Message(content, reply_to=msg)

    @app.train()
    def _train(msg, context):
        content = train(who(context), msg) if train else None
        if content is None:
            content = protocol.train_reply(honest_delta(protocol.read_theta(msg)), 10, 0.5)
        return Message(content, reply_to=msg)

    @app.evaluate()
    def _evaluate(msg, context):
        content = evaluate(who(context), msg) if evaluate else None
        if content is None:
            content = protocol.evaluate_reply(protocol.EvalResult(10, 6, 3.0))
        return Message(content, reply_to=msg)

    return app


def setup(app: ClientApp, nodes: int = 3, configs=None, **overrides):
    cfg = resolve_config("default", {**SMALL, **overrides})
    configs = configs or [{"partition-id": i} for i in range(nodes)]
    grid = InProcessGrid(app, configs, run_config={})
    return build_strategy(cfg), grid


def params(strategy) -> dict[str, torch.Tensor]:
    state = strategy.state
    out = {f"hnet.{k}": v.detach().clone() for k, v in state.hnet.state_dict().items()}
    out.update({f"emb.{k}": state.embedding(k).detach().clone() for k in state.clients})
    return out


def all_finite(strategy) -> bool:
    state = strategy.state
    tensors = list(state.hnet.parameters()) + list(state.embeddings.values())
    for group in state.optimizer.state.values():
        tensors += [v for v in group.values() if torch.is_tensor(v)]
    return all(torch.isfinite(t).all() for t in tensors)


def train_content(arrays: dict, metrics: dict | None = None) -> RecordDict:
    metrics = {protocol.NUM_EXAMPLES: 10, "train-loss": 0.5} if metrics is None else metrics
    return RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})


def failing_twin_run(**overrides):
    """The same federation where client c0's training fails (its reply is an error): the
    hypernetwork must end as if c0 had not answered."""

    def fail(i, msg):
        if i == 0:
            raise RuntimeError("c0 fails")

    strategy, grid = setup(app_with(train=fail), **overrides)
    return strategy, grid


# ------------------------------------------------------------ crashes from one reply
GARBAGE = Array(dtype="float32", shape=(SIZE,), stype="numpy.ndarray", data=b"garbage!")
HOSTILE_TRAIN = {
    "garbage bytes": lambda: train_content({protocol.DELTA: GARBAGE}),
    "other stype": lambda: train_content(
        {protocol.DELTA: Array(dtype="float32", shape=(SIZE,), stype="torch.raw", data=b"x" * 160)}
    ),
    "object dtype": lambda: train_content(
        {protocol.DELTA: Array(dtype="object", shape=(SIZE,), stype="numpy.ndarray", data=b"x")}
    ),
    "declared 10^12 entries": lambda: train_content(
        {protocol.DELTA: Array(dtype="float32", shape=(10**12,), stype="numpy.ndarray", data=b"")}
    ),
    "shape lies": lambda: train_content(
        {
            protocol.DELTA: Array(
                dtype="float32",
                shape=(SIZE,),
                stype="numpy.ndarray",
                data=Array(np.ones(3, np.float32)).data,
            )
        }
    ),  # fmt: skip
    "train-loss is a list": lambda: train_content(
        {protocol.DELTA: Array(np.zeros(SIZE, np.float32))},
        {protocol.NUM_EXAMPLES: 10, "train-loss": [1.0, 2.0]},
    ),
    "1e37 entries": lambda: train_content({protocol.DELTA: Array(np.full(SIZE, 1e37, np.float32))}),
    "-1e37 entries": lambda: train_content(
        {protocol.DELTA: Array(np.full(SIZE, -1e37, np.float32))}
    ),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE_TRAIN))
def test_a_hostile_train_reply_is_refused_and_changes_nothing(attack):
    strategy, grid = setup(
        app_with(train=lambda i, msg: HOSTILE_TRAIN[attack]() if i == 0 else None)
    )
    twin, twin_grid = failing_twin_run()
    strategy.start(grid)
    twin.start(twin_grid)
    row = strategy.history[-1]
    assert row["clients_trained"] == 2 and row["rejected"][0]["client"] == "c0"
    got, want = params(strategy), params(twin)
    assert all(torch.equal(got[k], want[k]) for k in want)  # as if c0 had not answered
    assert all_finite(strategy)


HOSTILE_QUERY = {
    "tensor-sizes an int": lambda: RecordDict(
        {
            "config": ConfigRecord(
                {
                    protocol.CLIENT_KEY: "c0",
                    protocol.NUM_PARAMS: SIZE,
                    protocol.TENSOR_SIZES: 7,
                    protocol.CLIENT_PROOF: proof_of("c0"),
                }
            )
        }
    ),  # fmt: skip
    "more tensor sizes than any model has": lambda: protocol.identity_reply(
        "c0",
        SIZE,
        proof=proof_of("c0"),
        extras={protocol.TENSOR_SIZES: [1] * (protocol.MAX_TENSORS + 1)},
    ),  # fmt: skip
    "arrays a ConfigRecord": lambda: RecordDict(
        {
            "config": ConfigRecord(
                {
                    protocol.CLIENT_KEY: "c0",
                    protocol.NUM_PARAMS: SIZE,
                    protocol.CLIENT_PROOF: proof_of("c0"),
                }
            ),
            "arrays": ConfigRecord({"initial": 1}),
        }
    ),  # fmt: skip
    "a 1 MB key": lambda: protocol.identity_reply("k" * 2**20, SIZE, proof=proof_of("c0")),
    "a key with control characters": lambda: protocol.identity_reply(
        "c0\n[round 1/1] accuracy 1.0", SIZE, proof=proof_of("c0")
    ),
    "no proof": lambda: protocol.identity_reply("c0", SIZE),
    "a short proof": lambda: RecordDict(
        {
            "config": ConfigRecord(
                {
                    protocol.CLIENT_KEY: "c0",
                    protocol.NUM_PARAMS: SIZE,
                    protocol.CLIENT_PROOF: "short",
                }
            )
        }
    ),  # fmt: skip
    "garbage initial": lambda: RecordDict(
        {
            "config": ConfigRecord(
                {
                    protocol.CLIENT_KEY: "c0",
                    protocol.NUM_PARAMS: SIZE,
                    protocol.CLIENT_PROOF: proof_of("c0"),
                }
            ),
            "arrays": ArrayRecord({protocol.INITIAL: GARBAGE}),
        }
    ),  # fmt: skip
}


@pytest.mark.parametrize("method", ["mh_pfedhn", "pfedhn", "fedavg"])
@pytest.mark.parametrize("attack", sorted(HOSTILE_QUERY))
def test_a_hostile_query_reply_is_refused(attack, method):
    app = app_with(query=lambda i, msg: HOSTILE_QUERY[attack]() if i == 0 else None)
    strategy, grid = setup(app, method=method, rounds=1)
    strategy.discover(grid, 5)
    assert 1000 in strategy.directory.refused
    assert "c0" not in strategy.state.clients
    assert len(strategy.directory.refused[1000].reason) < 400  # a 1 MB key is not echoed


def test_an_evaluation_with_no_examples_is_pooled_not_divided_by():
    empty = protocol.evaluate_reply(protocol.EvalResult(0, 0, 0.0))
    strategy, grid = setup(app_with(evaluate=lambda i, msg: empty if i == 0 else None))
    strategy.start(grid)
    row = strategy.history[0]
    assert row["accuracy"] == pytest.approx(12 / 20) and "c0" not in row["client_accuracy"]


def test_clients_without_data_do_not_stop_the_run(tiny_npz, tmp_path):
    """Honest clients: 240 images over 250 clients leave 10 of them with no sample at all
    and the others with one test sample and nothing to train on: the run goes through."""
    from client_app.app import app as client_app

    run_cfg = {
        "data.source": f"npz:{tiny_npz}", "data.partitioner": "iid", "data.num_clients": 250,
        "data.classes_per_client": 2,
        "clients.models": "mlp", "rounds": 1, "server.min_nodes": 250,
        "server.wait_for_nodes_s": 0, "server.checkpoint_every": 0,
        "hypernetwork.hidden_dim": 4, "data.cache_dir": str(tmp_path / "cache"),
        "server.output_root": str(tmp_path),
    }  # fmt: skip
    cfg = resolve_config("default", run_cfg)
    strategy = run_experiment(InProcessGrid.simulation(client_app, 250, run_cfg), cfg, "t")
    assert [r["round"] for r in strategy.history] == [0, 1]
    assert strategy.history[0]["clients_evaluated"] == 250
    assert strategy.history[0]["accuracy"] is not None
    reasons = {r["reason"] for r in strategy.history[1]["rejected"]}
    assert strategy.history[1]["clients_trained"] == 0 and reasons == {"num-examples is 0"}


def test_mh_pfedhngd_with_no_admitted_client_runs_its_rounds():
    refuse_all = lambda i, msg: protocol.identity_reply(f"c{i}", SIZE)  # noqa: E731 - no proof
    overrides = {"method": "mh_pfedhngd", "rounds": 2, "server.min_clients": 0}
    strategy, grid = setup(app_with(query=refuse_all), **overrides)
    strategy.start(grid)
    assert [r["round"] for r in strategy.history] == [0, 1, 2]
    assert not strategy.state.clients


def test_a_run_with_no_admitted_client_stops_naming_every_refusal():
    def query(i, msg):
        return protocol.identity_reply(f"c{i}", SIZE) if i else None  # c1, c2: no proof

    strategy, grid = setup(app_with(query=query), **{"server.min_clients": 2})
    with pytest.raises(RunAborted, match=r"1 client\(s\) admitted, server.min_clients=2") as err:
        strategy.start(grid)
    assert "node 1001: client 'c1' sent no client-proof" in str(err.value)
    assert "node 1002" in str(err.value) and not strategy.history


# ------------------------------------------------------------- poisoned state
def test_an_overflowing_update_is_refused_even_without_the_size_bound():
    """With server.max_delta_abs lifted, a 1e37 delta reaches the hypernetwork: its gradient
    norm overflows and the step is refused instead of writing NaN (both schedules)."""
    for schedule in ("parallel_sequential", "one_by_one", "parallel_mean"):

        def huge(i, msg):
            if i == 0:
                return train_content({protocol.DELTA: Array(np.full(SIZE, 1e37, np.float32))})
            return None

        strategy, grid = setup(
            app_with(train=huge),
            **{"server.max_delta_abs": 3e38, "hypernetwork.schedule": schedule},
        )
        strategy.start(grid)
        row = strategy.history[-1]
        assert "overflows" in row["rejected"][0]["reason"], schedule
        assert row["clients_trained"] == 2 and all_finite(strategy), schedule


def fedavg_round(claim: float, flip: bool = True):
    """FedAvg, 3 LeNet-free scripted clients; c0 claims `claim` examples and sends the flipped
    honest delta. Returns the global vector after one round."""

    def train(i, msg):
        delta = honest_delta(protocol.read_theta(msg))
        if i == 0:
            return protocol.train_reply(-100 * delta if flip else delta, int(claim), 0.5)
        return protocol.train_reply(delta, 10 + i, 0.5)

    def query(i, msg):
        extras = {protocol.INITIAL: np.ones(SIZE, np.float32)}
        return protocol.identity_reply(f"c{i}", SIZE, proof=proof_of(f"c{i}"), extras=extras)

    strategy, grid = setup(app_with(train=train, query=query), method="fedavg")
    strategy.start(grid)
    return strategy.state.weights.copy()


def test_a_huge_example_count_weighs_no_more_than_the_cap():
    """c0 claims 10^12 examples: it weighs as max_example_weight (4) x the median claim (12)
    = 48 examples, exactly as if it had claimed 48."""
    assert np.array_equal(fedavg_round(1e12), fedavg_round(48))
    assert not np.array_equal(fedavg_round(1e12), fedavg_round(47))
    assert bounded_weights({"a": 10, "b": 12, "c": 10**12}, 4.0) == {
        "a": 10.0,
        "b": 12.0,
        "c": 48.0,
    }
    assert bounded_weights({"a": 10, "c": 10**12}, 0) == {"a": 10.0, "c": 1e12}


def test_clients_without_examples_do_not_pull_the_cap_to_zero():
    """A client with an empty test split reports 0 examples; the cap is 4 x the median of
    the others, so the pool is theirs (it divided by zero when the median was 0)."""
    assert bounded_weights({"a": 0, "b": 50}, 4.0) == {"a": 0.0, "b": 50.0}
    assert bounded_weights({"a": 0, "b": 0, "c": 10, "d": 10**9}, 4.0)["d"] == 40.0
    assert bounded_weights({"a": 0, "b": 0}, 4.0) == {"a": 0.0, "b": 0.0}
    strategy = build_strategy(resolve_config("default", SMALL))
    stats = strategy.evaluation_stats(
        {"a": protocol.EvalResult(0, 0, 0.0), "b": protocol.EvalResult(50, 25, 10.0)}
    )
    assert stats["accuracy"] == 0.5 and stats["clients_evaluated"] == 2


def test_fedavg_refuses_a_nan_initial_vector():
    bad = np.ones(SIZE, np.float32)
    bad[3] = np.nan

    def query(i, msg):
        return protocol.identity_reply(f"c{i}", SIZE, proof=proof_of(f"c{i}"),
                                       extras={protocol.INITIAL: bad})  # fmt: skip

    strategy, grid = setup(app_with(query=query), method="fedavg")
    strategy.discover(grid, 5)
    assert strategy.state.weights is None and not strategy.state.clients
    assert "NaN" in strategy.directory.refused[1000].reason


def test_the_delta_norm_bound_scales_an_outlier_down():
    bound = DeltaNormBound(3.0, warmup=2)
    honest = np.full(10, 0.1, np.float32)
    for _ in range(2):
        assert bound(honest) == (honest, False)
    attack, scaled = bound(-100 * honest)
    assert scaled and np.linalg.norm(attack) == pytest.approx(3 * np.linalg.norm(honest), rel=1e-5)
    assert np.allclose(attack / np.linalg.norm(attack), -honest / np.linalg.norm(honest))
    # a K nobody else has is bounded by everyone's history from its first delta on
    odd, scaled = bound(np.full(12, 5.0, np.float32))
    assert scaled and np.linalg.norm(odd) / np.sqrt(12) == pytest.approx(0.3, rel=1e-5)
    off = DeltaNormBound(0.0)
    assert off(-100 * honest)[1] is False


def test_the_delta_norm_bound_in_a_round_limits_a_flipped_client():
    def attack(i, msg):
        if i == 0:
            return protocol.train_reply(-100 * honest_delta(protocol.read_theta(msg)), 10, 0.5)
        return None

    strategy, grid = setup(app_with(train=attack), rounds=6, **{"server.delta_norm_bound": 2.0})
    strategy.start(grid)
    scaled = [r.get("deltas_scaled", 0) for r in strategy.history[1:]]
    assert sum(scaled) >= 4  # c0's delta, once the bound has seen honest ones


# --------------------------------------------------------------------- memory
def test_a_registration_over_the_memory_budget_is_refused_before_allocating():
    settings = HypernetworkSettings(chunk_size=16, embedding_dim=4, hidden_dim=8)
    server = HypernetworkServer(settings, memory_budget=1e-4, client_memory=1)  # 100 kB in all
    server.register("small", 40)  # 3 chunks: a head of 3 * (8 * 16 + 16) weights = 6.9 kB
    before = server.num_parameters()
    with pytest.raises(RegistrationError, match=r"needs 0\.\d+ GB more.*server\.memory_budget_gb"):
        server.register("big", 16 * 100)  # 100 chunks: 230 kB with gradients and Adam state
    assert server.num_parameters() == before and "big" not in server.clients


def test_the_default_budget_fits_the_machine():
    server = HypernetworkServer()
    total = __import__("os").sysconf("SC_PAGE_SIZE") * __import__("os").sysconf("SC_PHYS_PAGES")
    assert 0.4 * total < server.memory_budget <= 0.5 * total
    with pytest.raises(RegistrationError, match="client_memory_gb"):
        server.register("greedy", 50_000_000)  # the largest K allowed: ~100 GB of head


# -------------------------------------------------------------- impersonation
def test_an_impostor_is_refused_and_gets_nothing_of_the_key(caplog):
    received = []

    def train(i, msg):
        received.append(i)

    configs = [{"partition-id": 0, "client-key": "alice"}, {"partition-id": 1}]
    strategy, grid = setup(app_with(train=train), configs=configs, rounds=2)
    strategy.discover(grid, 5)
    alice = strategy.state.embedding("alice").detach().clone()
    # an impostor node appears, claiming "alice" with its own secret
    impostor = copy.deepcopy(grid.contexts[1000])
    impostor.node_id, impostor.node_config["partition-id"] = 3000, 2
    grid.contexts[3000] = impostor
    original = grid.client_app

    def as_impostor(msg, context):
        if context.node_id == 3000 and msg.metadata.message_type == "query":
            reply = protocol.identity_reply("alice", SIZE, proof="a-different-secret-0123")
            return Message(reply, reply_to=msg)
        return original(msg, context)

    grid.client_app = as_impostor
    with caplog.at_level(logging.WARNING, logger="flwr.mh_pfedhn"):
        strategy.start(grid)
    assert "impostor" in caplog.text and "a-different-secret" not in caplog.text
    assert strategy.directory.node_of["alice"] == 1000 and 3000 in strategy.directory.refused
    assert 2 not in received  # nothing was sent to it
    assert not torch.equal(strategy.state.embedding("alice"), alice)  # alice trained
    row_text = json.dumps(strategy.history)
    assert "a-different-secret" not in row_text and proof_of("alice") not in row_text


def test_a_restarted_client_with_its_secret_gets_its_embeddings_back(tmp_path):
    configs = [{"partition-id": 0, "client-key": "alice"}, {"partition-id": 1}]
    strategy, grid = setup(app_with(), configs=configs)
    strategy.discover(grid, 5)
    before = strategy.state.generate(["alice"])["alice"]
    context = grid.contexts.pop(1000)
    context.node_id = 2000
    grid.contexts[2000] = context
    strategy.discover(grid, 5)
    assert strategy.directory.node_of["alice"] == 2000
    assert np.array_equal(strategy.state.generate(["alice"])["alice"], before)


def test_with_bound_node_ids_the_right_secret_on_another_node_is_refused():
    configs = [{"partition-id": 0, "client-key": "alice"}, {"partition-id": 1}]
    strategy, grid = setup(app_with(), configs=configs, **{"server.bind_node_ids": True})
    strategy.discover(grid, 5)
    context = grid.contexts.pop(1000)
    context.node_id = 2000
    grid.contexts[2000] = context
    strategy.discover(grid, 5)
    assert strategy.directory.node_of["alice"] == 1000
    assert "bound to node 1000" in strategy.directory.refused[2000].reason


def test_checkpoints_keep_salted_hashes_and_no_secret(tmp_path):
    overrides = {**SMALL, "server.output_root": str(tmp_path), "server.run_name": "r"}
    cfg = resolve_config("default", overrides)
    run_experiment(InProcessGrid(app_with(), [{"partition-id": i} for i in range(2)], {}), cfg, 0)
    raw = (tmp_path / "r" / CHECKPOINT_NAME).read_bytes()
    assert proof_of("c0").encode() not in raw and b"$" in raw
    assert proof_of("c0") not in (tmp_path / "r" / "metrics.jsonl").read_text()


# ----------------------------------------------------------------- checkpoints
def checkpointed_run(tmp_path, **overrides):
    settings = {**SMALL, "rounds": 2, "server.output_root": str(tmp_path),
                "server.run_name": "r", **overrides}  # fmt: skip
    cfg = resolve_config("default", settings)
    grid = InProcessGrid(app_with(), [{"partition-id": i} for i in range(3)], {})
    run_experiment(grid, cfg, 0)
    return tmp_path / "r" / CHECKPOINT_NAME


def resume(tmp_path, **overrides):
    settings = {**SMALL, "rounds": 3, "server.output_root": str(tmp_path),
                "server.resume": str(tmp_path / "r"), **overrides}  # fmt: skip
    cfg = resolve_config("default", settings)
    grid = InProcessGrid(app_with(), [{"partition-id": i} for i in range(3)], {})
    return run_experiment(grid, cfg, 0)


def test_a_crafted_checkpoint_cannot_run_code(tmp_path):
    path = checkpointed_run(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import hashlib
    import io

    buffer = io.BytesIO()
    torch.save({"format": 2, "kind": "HypernetworkServer", "x": Exploit()}, buffer)
    payload = buffer.getvalue()
    path.write_bytes(b"MH-pFedHN checkpoint\n" + hashlib.sha256(payload).hexdigest().encode()
                     + b"\n" + payload)  # fmt: skip
    with pytest.raises(CheckpointError, match="damaged or not a checkpoint"):
        load_checkpoint(path, HypernetworkServer)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "random", "empty"])
def test_a_damaged_checkpoint_says_what_is_wrong(tmp_path, damage):
    path = checkpointed_run(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    elif damage == "truncate":
        data = data[: len(data) // 3]
    elif damage == "random":
        data = bytearray(np.random.default_rng(0).bytes(4096))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged or not a checkpoint.*start the run again"):
        resume(tmp_path)


def test_a_leftover_temporary_file_is_cleaned_up(tmp_path):
    path = checkpointed_run(tmp_path)
    leftover = path.with_name(path.name + ".tmp")
    leftover.write_bytes(b"half a checkpoint")
    strategy = resume(tmp_path)
    assert not leftover.exists() and strategy.history[-1]["round"] == 3


@pytest.mark.parametrize(
    ("change", "named"),
    [({"method": "mh_pfedhngd"}, "method"), ({"data.source": "npz:/elsewhere.npz"}, "data.source"),
     ({"clients.models": "mlp"}, "clients.models")],
)  # fmt: skip
def test_a_resume_with_other_defining_settings_is_refused_naming_them(tmp_path, change, named):
    checkpointed_run(tmp_path)
    with pytest.raises((ConfigError, CheckpointError), match=named):
        resume(tmp_path, **change)


def test_a_resume_with_fewer_rounds_says_so(tmp_path):
    checkpointed_run(tmp_path)
    with pytest.raises(ConfigError, match="after round 2; rounds=2 leaves nothing to run"):
        resume(tmp_path, rounds=2)


# --------------------------------------------------------------- smaller ones
def test_a_refused_node_is_asked_again_after_a_back_off():
    answers = {"n": 0}

    def flaky_query(i, msg):
        if i == 0:
            answers["n"] += 1
            if answers["n"] <= 2:  # a transient failure, twice
                raise RuntimeError("disk not mounted yet")
        return None

    strategy, grid = setup(app_with(query=flaky_query), rounds=5)
    strategy.start(grid)
    assert "c0" in strategy.state.clients
    trained = [r["clients_trained"] for r in strategy.history[1:]]
    assert trained[0] == 2 and trained[-1] == 3  # refused, asked again, admitted


def test_client_keys_map_to_distinct_safe_folders():
    names = {key: folder_name(key) for key in ("a/b", "a_b", "..", ".", "site-0", "a%2Fb", "é")}
    assert len(set(names.values())) == len(names)
    assert names["site-0"] == "site-0" and all("/" not in n and n not in (".", "..")
                                               for n in names.values())  # fmt: skip
    assert len(folder_name("k" * 128)) <= 200


def test_an_unknown_node_config_key_is_refused_listing_the_valid_ones():
    cfg = resolve_config("default", {"data.num_clients": 2})
    with pytest.raises(NodeConfigError, match=r"unknown node config key\(s\) \['modle'\].*model"):
        client_spec({"partition-id": 0, "modle": "mlp"}, cfg)
    with pytest.raises(NodeConfigError, match="client-key"):
        client_spec({"partition-id": 0, "client-key": "k" * 200}, cfg)


def test_a_refused_mh_pfedhngd_registration_leaves_nothing_registered():
    def query(i, msg):
        k_g = SIZE if i == 0 else SIZE + 8  # c1's data gives another global model size
        return protocol.identity_reply(f"c{i}", SIZE, proof=proof_of(f"c{i}"),
                                       extras={protocol.GLOBAL_NUM_PARAMS: k_g})  # fmt: skip

    strategy, grid = setup(app_with(query=query), nodes=2, method="mh_pfedhngd")
    strategy.discover(grid, 5)
    assert "c0" in strategy.state.clients and "c1" not in strategy.state.clients
    assert "K_g" in strategy.directory.refused[1001].reason


@pytest.mark.parametrize(
    ("reason", "said"),
    [
        # as Flower's deployment runtime words a raised exception (run_clientapp.py)
        ("<class 'client_app.spec.NodeConfigError'>:<'unknown node config key(s) ['modle']'>",
         "NodeConfigError: unknown node config key(s) ['modle']"),
        ("<class 'ZeroDivisionError'>:<'division by zero'>", "ZeroDivisionError: division by zero"),
        ("RuntimeError: disk not mounted yet", "RuntimeError: disk not mounted yet"),  # in-process
        ("<class 'x'> and more", "<class 'x'> and more"),  # not Flower's wording: kept as sent
        ("<class 'ValueError'>:<'it's <2>\nline two'>", "ValueError: it's <2>\nline two"),
        # as Flower's Ray simulation words it (a ClientAppException in Ray's coloured traceback)
        ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor"
         ".run()\x1b[39m (pid=1, ip=127.0.0.1)\n  File \"/x/ray_actor.py\", line 60, in run\n"
         "client_app.models.ModelError: cannot import module 'mynets'\n\nThe above exception was "
         "the direct cause of the following exception:\n\n\x1b[36mray::ClientAppActor.run()"
         "\x1b[39m (pid=1, ip=127.0.0.1)\n  File \"/x/ray_actor.py\", line 65, in run\n"
         "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. "
         "Message: cannot import module 'mynets''>",
         "ModelError: cannot import module 'mynets'"),
        ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() "
         "(pid=1)\n  File \"/x/a.py\", line 3, in run\nAssertionError\n\nThe above exception "
         "was the direct cause of the following exception:\n\nflwr.clientapp.client_app."
         "ClientAppException: \nException ClientAppException occurred. Message: '>",
         "AssertionError: (no message)"),
    ],
)  # fmt: skip
def test_an_error_reply_is_said_plainly(reason, said):
    from flwr.app import Error, Metadata

    metadata = Metadata(run_id=1, message_id="r", src_node_id=1, dst_node_id=0,
                        reply_to_message_id="q", group_id="", created_at=0.0, ttl=10.0,
                        message_type=protocol.TRAIN)  # fmt: skip
    reply = Message(metadata=metadata, error=Error(2, reason))
    assert protocol.error_text(reply) == f"client error 2: {said}"
    with pytest.raises(protocol.ReplyError, match="client error 2: "):
        protocol.parse_train_reply(reply, 10, 1.0, "delta")
