"""The Strategy's round logic and its refusal of bad input (docs/concepts/round.md).

Clients here are scripted ClientApps speaking the protocol, run through the in-process grid,
so each misbehaviour is exact and the server's state can be compared bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import protocol
from common.config import resolve_config
from server_app.methods.mh_pfedhn import MHpFedHN
from server_app.run import build_state
from simulation.grid import InProcessGrid

SMALL = {
    "hypernetwork.chunk_size": 16,
    "hypernetwork.embedding_dim": 4,
    "hypernetwork.hidden_dim": 8,
    "server.max_params": 1000,
    "server.min_nodes": 1,
    "server.wait_for_nodes_s": 0,
    "rounds": 1,
    "clients.models": "lenet",  # the apps here report their own K; one name suits every method
}


def proof_of(key: str) -> str:
    """A scripted client's secret (at least 16 characters, one per key)."""
    return f"secret-of-{key}-0123456789"


def scripted_app(behaviour_of: dict[int, str], size_of: dict[int, object]) -> ClientApp:
    """A ClientApp whose partition i replies as behaviour_of[i] says."""
    app = ClientApp()

    def who(context) -> int:
        return int(context.node_config["partition-id"])

    @app.query()
    def query(msg, context):
        i = who(context)
        key = context.node_config.get("client-key", f"c{i}")
        reply = protocol.identity_reply(key, size_of.get(i, 40), proof=proof_of(key))
        return Message(reply, reply_to=msg)

    @app.train()
    def train(msg, context):
        theta = protocol.read_theta(msg)
        kind = behaviour_of.get(who(context), "good")
        delta = 0.01 * theta
        if kind == "wrong-length":
            delta = delta[:-1]
        elif kind == "nan":
            delta = delta.copy()
            delta[3] = np.nan
        elif kind == "inf":
            delta = delta.copy()
            delta[0] = np.inf
        elif kind == "float64":
            arrays = ArrayRecord({protocol.DELTA: Array(delta.astype(np.float64))})
            metrics = MetricRecord({protocol.NUM_EXAMPLES: 10})
            return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
        elif kind == "raises":
            raise RuntimeError("deliberate failure")
        elif kind == "missing-metrics":
            content = protocol.train_reply(delta, 10, 0.1)
            return Message(RecordDict({"arrays": content["arrays"]}), reply_to=msg)
        elif kind == "missing-arrays":
            metrics = MetricRecord({protocol.NUM_EXAMPLES: 10})
            return Message(RecordDict({"metrics": metrics}), reply_to=msg)
        elif kind == "zero-examples":
            return Message(protocol.train_reply(delta, 0, 0.1), reply_to=msg)
        return Message(protocol.train_reply(delta, 10, 0.1), reply_to=msg)

    @app.evaluate()
    def evaluate(msg, context):
        return Message(
            protocol.evaluate_reply(protocol.EvalResult(10, 5 + who(context) % 3, 2.0)),
            reply_to=msg,
        )

    return app


def run(behaviour_of, size_of=None, num_nodes=None, node_configs=None, **overrides):
    cfg = resolve_config("default", {**SMALL, **overrides})
    size_of = size_of or {}
    app = scripted_app(behaviour_of, size_of)
    if node_configs is None:
        n = num_nodes or len(behaviour_of)
        node_configs = [{"partition-id": i} for i in range(n)]
    grid = InProcessGrid(app, node_configs, run_config={})
    strategy = MHpFedHN(build_state(cfg), cfg)
    return strategy, grid


def snapshot(strategy: MHpFedHN) -> dict[str, torch.Tensor]:
    server = strategy.state
    state = {f"hnet.{k}": v.clone() for k, v in server.hnet.state_dict().items()}
    state.update({f"emb.{k}": v.detach().clone() for k, v in server.embeddings.items()})
    return state


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


BAD_REPLIES = [
    "wrong-length",
    "nan",
    "inf",
    "float64",
    "raises",
    "missing-metrics",
    "missing-arrays",
    "zero-examples",
]


@pytest.mark.parametrize("kind", BAD_REPLIES)
def test_a_bad_reply_is_rejected_logged_and_changes_nothing(kind, caplog):
    strategy, grid = run({0: kind})
    strategy.discover(grid, timeout=10)
    before = snapshot(strategy)
    with caplog.at_level("WARNING", logger="flwr.mh_pfedhn"):
        strategy.start(grid)
    assert same(before, snapshot(strategy))
    rows = strategy.history
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients_trained"] == 0
    assert [r["client"] for r in rows[1]["rejected"]] == ["c0"]
    assert "rejected reply from c0" in caplog.text


def test_the_round_goes_on_with_the_good_clients():
    behaviour = {0: "good", 1: "nan", 2: "wrong-length", 3: "good", 4: "raises"}
    strategy, grid = run(behaviour, size_of={3: 100})
    strategy.discover(grid, timeout=10)
    embeddings = {k: strategy.state.embedding(k).detach().clone() for k in ("c1", "c2", "c4")}
    good = {k: strategy.state.embedding(k).detach().clone() for k in ("c0", "c3")}
    strategy.start(grid)
    row = strategy.history[-1]
    assert row["clients_trained"] == 2
    assert sorted(r["client"] for r in row["rejected"]) == ["c1", "c2", "c4"]
    for key, value in embeddings.items():
        assert torch.equal(strategy.state.embedding(key), value)
    for key, value in good.items():
        assert not torch.equal(strategy.state.embedding(key), value)
    assert row["bytes_up"] == 4 * (40 + 100)


@pytest.mark.parametrize("bad_k", [0, -3, 2.5, "40", 10_001, True])
def test_a_bad_parameter_count_is_refused(bad_k, caplog):
    strategy, grid = run(
        {0: "good", 1: "good"}, size_of={1: bad_k}, **{"server.max_params": 10_000}
    )
    with caplog.at_level("WARNING", logger="flwr.mh_pfedhn"):
        strategy.start(grid)
    assert list(strategy.state.clients) == ["c0"]
    assert len(strategy.directory.refused) == 1
    assert "refused" in caplog.text
    assert strategy.history[-1]["clients_trained"] == 1


def test_a_node_never_admitted_is_in_the_summary_and_the_closing_line(caplog):
    """A run goes on without a site whose registration fails (server.min_clients allows it);
    its end must say so, not only a warning at the start (found by a user under flwr run)."""
    from server_app.events import ConsoleProgress, Observers

    strategy, grid = run({0: "good", 1: "good"}, size_of={1: 0}, rounds=2)
    summaries = []

    class Keep(ConsoleProgress):
        def run_finished(self, summary):
            summaries.append(summary)
            super().run_finished(summary)

    strategy.observers = Observers([Keep()])
    with caplog.at_level("INFO", logger="flwr.mh_pfedhn"):
        strategy.start(grid)
    (node,) = strategy.directory.refused
    (entry,) = summaries[0]["unadmitted_nodes"].values()
    assert list(summaries[0]["unadmitted_nodes"]) == [str(node)]
    assert entry["count"] >= 1 and "K must be a positive integer" in entry["last_reason"]
    assert "| 1 nodes never admitted (summary.json)" in caplog.records[-1].getMessage()


def test_a_site_refused_then_admitted_from_a_new_node_is_not_reported_as_never_admitted():
    """A fixed site restarts with a new node id; its old id's refusal is not a missing site."""
    from server_app.client_directory import ClientDirectory

    directory = ClientDirectory(require_proof=False)
    directory.refuse(1001, "K=0", 0, key="site-a")
    directory.refuse(1002, "no identity", 0)  # said no key
    directory.refuse(1003, "K=0", 0, key="site-b")
    directory.refuse(1003, "K=0", 2, key="site-b")
    directory.bind(protocol.Identity("site-a", 40), 1004)
    assert list(directory.unadmitted()) == ["1002", "1003"]
    assert directory.unadmitted()["1003"] == {
        "count": 2,
        "first_round": 0,
        "last_round": 2,
        "last_reason": "K=0",
        "key": "site-b",
    }


def test_a_key_reporting_a_different_k_is_refused():
    configs = [{"partition-id": 0, "client-key": "same"}, {"partition-id": 1, "client-key": "same"}]
    strategy, grid = run({}, size_of={0: 40, 1: 48}, node_configs=configs)
    strategy.start(grid)
    assert strategy.state.record("same").num_params == 40
    (refusal,) = strategy.directory.refused.values()
    assert "registered with K=40" in refusal.reason


def test_a_query_reply_the_parser_fails_on_is_refused_and_the_others_admitted(monkeypatch):
    """Defence in depth: a parser bug (not a ReplyError) on one site's query reply refuses
    that site, naming the error, instead of stopping the server."""
    parse = protocol.parse_identity

    def failing_for_c1(reply, fields=()):
        identity = parse(reply, fields)
        if identity.client_key == "c1":
            raise KeyError("tensor-sizes")
        return identity

    monkeypatch.setattr(protocol, "parse_identity", failing_for_c1)
    strategy, grid = run({0: "good", 1: "good"})
    strategy.start(grid)
    assert list(strategy.state.clients) == ["c0"]
    (refusal,) = strategy.directory.refused.values()
    assert refusal.reason == "unusable reply (KeyError)"


def test_missing_identity_is_refused():
    app = ClientApp()

    @app.query()
    def query(msg, context):
        return Message(RecordDict({"config": ConfigRecord({"something": 1})}), reply_to=msg)

    cfg = resolve_config("default", SMALL)
    grid = InProcessGrid(app, [{"partition-id": 0}], run_config={})
    strategy = MHpFedHN(build_state(cfg), cfg)
    strategy.discover(grid, timeout=5)
    assert not strategy.state.clients
    assert "client-key" in next(iter(strategy.directory.refused.values())).reason


def test_metrics_are_pooled_and_per_client():
    strategy, grid = run({i: "good" for i in range(3)})
    strategy.start(grid)
    row = strategy.history[-1]
    # clients answer 10 samples with 5, 6, 7 correct
    assert row["accuracy"] == pytest.approx(18 / 30)
    assert row["accuracy_client_mean"] == pytest.approx(np.mean([0.5, 0.6, 0.7]))
    assert row["client_accuracy"] == {"c0": 0.5, "c1": 0.6, "c2": 0.7}
    assert row["loss"] == pytest.approx(0.2)
    assert row["bytes_down"] == 2 * 3 * 4 * 40  # train + evaluate vectors
    assert row["bytes_up"] == 3 * 4 * 40


def test_the_console_closes_a_run_with_its_final_and_best_rounds(caplog, tmp_path):
    from server_app.events import ConsoleProgress, Observers
    from server_app.round_log import run_summary

    strategy, grid = run({i: "good" for i in range(3)})
    strategy.observers = Observers([ConsoleProgress(tmp_path / "run")])
    with caplog.at_level("INFO", logger="flwr.mh_pfedhn"):
        strategy.start(grid)
    summary = run_summary(strategy.history)
    last = caplog.records[-1].getMessage()
    assert last.startswith("done after round 1 | final accuracy 0.6000 (round 1) | best ")
    assert f"(round {summary['best_round']})" in last and last.endswith(f"outputs: {tmp_path}/run")
    assert f"down {summary['total_bytes_down'] / 1e6:.2f} MB" in last
    assert "rejected" not in summary and "rejected" not in last


def test_the_summary_and_closing_line_name_the_clients_whose_replies_were_refused(caplog, tmp_path):
    """A deployment rides out a site whose replies are refused; the run's end says which."""
    from server_app.events import ConsoleProgress, Observers
    from server_app.round_log import run_summary

    strategy, grid = run({0: "good", 1: "nan", 2: "raises"}, rounds=3)
    strategy.observers = Observers([ConsoleProgress(tmp_path / "run")])
    with caplog.at_level("INFO", logger="flwr.mh_pfedhn"):
        strategy.start(grid)
    rejected = run_summary(strategy.history)["rejected"]
    assert sorted(rejected) == ["c1", "c2"]
    assert {k: (v["count"], v["first_round"], v["last_round"]) for k, v in rejected.items()} == {
        "c1": (3, 1, 3),
        "c2": (3, 1, 3),
    }
    assert rejected["c1"]["last_reason"] == "delta holds 1 NaN/Inf values"
    assert rejected["c2"]["last_reason"].endswith("RuntimeError: deliberate failure")
    assert (
        "| 6 replies refused or missing, from 2 clients (summary.json)"
        in caplog.records[-1].getMessage()
    )


def test_a_failing_client_stops_a_run_that_asks_for_it_naming_the_client_and_its_error():
    """server.stop_on_client_error (set by the sweep runner: a simulated client is the
    experiment's own, so its failure is a bug to see, not a site to ride out)."""
    from server_app.round_loop import RunAborted

    strategy, grid = run({0: "good", 1: "raises"}, **{"server.stop_on_client_error": True})
    with pytest.raises(RunAborted, match=r"round 1: client c1 failed, .*deliberate failure"):
        strategy.start(grid)


def test_a_client_refused_in_both_phases_counts_once_and_each_phase_is_named():
    """MH-pFedHNGD refuses per phase: the summary keeps the phases apart, the closing line
    counts the client once."""
    from server_app.events import closing_line
    from server_app.round_log import run_summary

    def row(n, *rejected):
        return {"round": n, "accuracy": None, "seconds": 1.0, "bytes_down": 0, "bytes_up": 0,
                "rejected": list(rejected)}  # fmt: skip

    north, south = "lab (north)", "lab (south)"  # keys may hold " (": the phase is a field
    global_refusal = {"client": north, "phase": "global", "reason": "no reply before the timeout"}
    history = [row(1, {"client": north, "reason": "r"}, global_refusal),
               row(2, global_refusal, {"client": south, "reason": "r"})]  # fmt: skip
    summary = run_summary(history)
    counts = {k: (v["client"], v["count"]) for k, v in summary["rejected"].items()}
    assert counts == {north: (north, 1), f"{north} (global phase)": (north, 2), south: (south, 1)}
    assert "4 replies refused or missing, from 2 clients" in closing_line(summary)


def test_a_node_that_joins_later_is_queried_and_trained():
    strategy, grid = run({i: "good" for i in range(3)}, rounds=2)
    grid.disconnected.add(1002)
    strategy.discover(grid, timeout=5)
    assert sorted(strategy.state.clients) == ["c0", "c1"]
    grid.disconnected.clear()
    strategy.start(grid)
    assert sorted(strategy.state.clients) == ["c0", "c1", "c2"]
    assert strategy.history[-1]["clients_trained"] == 3


def test_a_restarted_node_keeps_its_embeddings_by_key():
    configs = [{"partition-id": 0, "client-key": "alice"}, {"partition-id": 1}]
    strategy, grid = run({}, node_configs=configs)
    strategy.discover(grid, timeout=5)
    before = strategy.state.generate(["alice"])["alice"]
    # the node comes back under a new node id with the same key
    context = grid.contexts.pop(1000)
    context.node_id = 2000
    grid.contexts[2000] = context
    strategy.discover(grid, timeout=5)
    assert strategy.directory.node_of["alice"] == 2000
    assert len(strategy.state.clients) == 2
    assert np.array_equal(strategy.state.generate(["alice"])["alice"], before)


def test_partial_participation_is_seeded_and_leaves_others_untouched():
    strategy, grid = run({i: "good" for i in range(6)}, **{"server.fraction_train": 0.5})
    strategy.discover(grid, timeout=5)
    keys = strategy.connected_clients(grid)
    chosen = strategy.sample(1, keys)
    assert len(chosen) == 3 and chosen == strategy.sample(1, keys)
    others = {k: strategy.state.embedding(k).detach().clone() for k in keys if k not in chosen}
    strategy.start(grid)
    for key, value in others.items():
        assert torch.equal(strategy.state.embedding(key), value)
