"""Novel clients and novel architectures on a frozen hypernetwork (paper 4.4, Figures 3-5)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Message

from client_app.app import app as client_app
from client_app.spec import NodeConfigError, client_spec
from common import protocol
from common.config import ConfigError, resolve_config
from server_app import run_plot
from server_app.hypernetwork_server import HypernetworkServer, HypernetworkSettings
from server_app.run import build_strategy
from server_app.schedules import ParallelSequential
from server_app.server_state import RegistrationError
from simulation.grid import InProcessGrid

SMALL = HypernetworkSettings(chunk_size=8, embedding_dim=4, hidden_dim=6)


def apply(server: HypernetworkServer, deltas: dict, server_round: int) -> None:
    """One step per client, at the state the previous one left."""
    ParallelSequential().apply(server, deltas, server_round)


def tensors(server: HypernetworkServer) -> dict[str, torch.Tensor]:
    state = {f"hnet.{k}": v.detach().clone() for k, v in server.hnet.state_dict().items()}
    state.update({f"emb.{k}": server.embedding(k).detach().clone() for k in server.clients})
    return state


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_a_frozen_hypernetwork_stays_bit_identical_while_novel_embeddings_move():
    server = HypernetworkServer(SMALL, seed=0, max_params=1000)
    server.register("a", 20)
    server.register("b", 30)
    apply(server, {"a": np.ones(20, np.float32), "b": np.ones(30, np.float32)}, 1)
    server.freeze()
    server.register("novel", 20)  # the head of tau 3 exists and stays frozen
    before = tensors(server)
    for r in range(2, 5):
        apply(server, {"novel": np.full(20, 0.1, np.float32)}, r)
    assert changed(before, tensors(server)) == {"emb.novel"}


def test_an_unseen_tau_gets_a_new_head_that_trains_while_the_extractor_does_not():
    server = HypernetworkServer(SMALL, seed=0, max_params=1000)
    server.register("a", 20)
    server.freeze()
    record = server.register("new-architecture", 100)  # tau 13: no head before
    assert record.tau == 13 and server.hnet.has_head(13)
    before = tensors(server)
    apply(server, {"new-architecture": np.full(100, 0.1, np.float32)}, 1)
    assert changed(before, tensors(server)) == {
        "hnet.heads.tau13.weight",
        "hnet.heads.tau13.bias",
        "emb.new-architecture",
    }


def test_the_frozen_parts_survive_a_checkpoint():
    server = HypernetworkServer(SMALL, seed=0, max_params=1000)
    server.register("a", 20)
    server.freeze(embedding_lr=0.05)
    server.register("b", 100)
    assert [g["lr"] for g in server.optimizer.param_groups][-1] == 0.05  # b's embedding
    restored = HypernetworkServer.from_state_dict(server.state_dict())
    assert restored.frozen == server.frozen
    assert [g["lr"] for g in restored.optimizer.param_groups][-1] == 0.05
    before = tensors(restored)
    apply(restored, {"a": np.ones(20, np.float32), "b": np.ones(100, np.float32)}, 1)
    assert changed(before, tensors(restored)) == {
        "hnet.heads.tau13.weight",
        "hnet.heads.tau13.bias",
        "emb.b",
    }


# ------------------------------------------------------------------ the run
def run_config(tiny_npz, tmp_path, **extra):
    return {
        "experiment": "default",
        "data.source": f"npz:{tiny_npz}",
        "data.num_clients": 4,
        "data.classes_per_client": 2,
        "data.normalize": "none",
        "data.cache_dir": str(tmp_path / "cache"),
        "clients.models": "lenet",
        "client.epochs": 1,
        "hypernetwork.hidden_dim": 8,
        "rounds": 4,
        "server.min_nodes": 4,
        "server.wait_for_nodes_s": 0,
        "server.checkpoint_every": 0,
        "server.output_root": str(tmp_path / "out"),
        "generalization.join_round": 2,
        "generalization.novel_clients": 1,
        **extra,
    }


def run(run_cfg):
    cfg = resolve_config("default", run_cfg)
    grid = InProcessGrid.simulation(client_app, 4, run_cfg)
    strategy = build_strategy(cfg)
    at_join = {}
    join = strategy.novel.join

    def join_and_snapshot(*args):
        refused = join(*args)
        at_join.update(tensors(strategy.state))
        return refused

    strategy.novel.join = join_and_snapshot
    strategy.start(grid)
    return strategy, at_join


@pytest.mark.parametrize(
    ("method", "novel_model", "new_head"),
    [
        ("mh_pfedhn", "lenet", False),  # a novel client of a seen architecture
        ("mh_pfedhn", "mlp", True),  # a novel architecture: a new head trains
        ("mh_pfedhngd", "mlp", True),
    ],
)
def test_novel_clients_join_after_training_and_only_they_learn(
    method, novel_model, new_head, tiny_npz, tmp_path
):
    strategy, at_join = run(
        run_config(
            tiny_npz, tmp_path, method=method, **{"generalization.novel_models": novel_model}
        )
    )
    server, rows = strategy.state, strategy.history
    novel = "partition-3"
    roles = {f"partition-{i}": "training" for i in range(3)} | {novel: "novel"}
    assert strategy.novel.roles == roles
    # held back during training: not registered, not trained, not evaluated
    assert [r["clients_trained"] for r in rows[1:]] == [3, 3, 1, 1]
    assert [r["novel_clients"] for r in rows] == [0, 0, 1, 1, 1]
    assert [r["training_clients"] for r in rows] == [3, 3, 3, 3, 3]
    assert rows[0]["novel_accuracy"] is None and rows[2]["novel_accuracy"] is not None
    assert all(r["training_accuracy"] is not None for r in rows)
    assert not any(r["rejected"] for r in rows)
    # after the join only the novel client's embedding (and its new head) moved
    expected = {f"emb.{novel}"}
    tau = server.record(novel).tau
    if new_head:
        expected |= {f"hnet.heads.tau{tau}.weight", f"hnet.heads.tau{tau}.bias"}
    assert changed(at_join, tensors(server)) == expected
    assert (f"tau{tau}" not in server.frozen.heads) is new_head
    if method == "mh_pfedhngd":  # phase 1 ran while training, not after the join
        assert [r.get("global_clients_trained") for r in rows[1:]] == [3, 3, None, None]


def test_a_novel_client_without_a_generalization_phase_is_refused(tiny_npz, tmp_path):
    run_cfg = run_config(tiny_npz, tmp_path, rounds=1)
    run_cfg.pop("generalization.join_round")
    run_cfg.pop("generalization.novel_clients")
    nodes = [{"partition-id": i, "num-partitions": 4, "role": "novel" if i == 3 else ""}
             for i in range(4)]  # fmt: skip
    cfg = resolve_config("default", run_cfg)
    grid = InProcessGrid(client_app, nodes, run_cfg)
    strategy = build_strategy(cfg)
    strategy.discover(grid, timeout=5)
    assert "partition-3" not in server_keys(strategy)
    assert "no generalization phase" in next(iter(strategy.directory.refused.values())).reason


def server_keys(strategy) -> set[str]:
    return set(strategy.state.clients)


def test_node_config_role_and_the_simulation_rule(tiny_npz, tmp_path):
    cfg = resolve_config(
        "default",
        run_config(tiny_npz, tmp_path, **{"generalization.novel_models": "mlp,resnet10"}),
    )
    nodes = [{"partition-id": i, "num-partitions": 4} for i in range(4)]
    specs = [client_spec(n, cfg) for n in nodes]
    assert [(s.role, s.model_name) for s in specs] == [("training", "lenet")] * 3 + [
        ("novel", "mlp")
    ]
    deployed = client_spec({"partition-id": 0, "num-partitions": 4, "role": "novel"}, cfg)
    assert deployed.role == "novel"
    with pytest.raises(NodeConfigError, match="role"):
        client_spec({"partition-id": 0, "num-partitions": 4, "role": "tester"}, cfg)
    reply = protocol.identity_reply("k", 10, role="novel")
    assert protocol.parse_identity(_as_reply(reply)).role == "novel"
    with pytest.raises(protocol.ReplyError, match="role"):
        reply["config"][protocol.ROLE] = "boss"
        protocol.parse_identity(_as_reply(reply))


def _as_reply(content):
    return Message(content, dst_node_id=1, message_type=protocol.QUERY)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"generalization.join_round": 5, "rounds": 5}, "below rounds"),
        ({"generalization.novel_clients": 2}, "join_round >= 1"),
        ({"generalization.join_round": 1, "method": "fedavg"}, "needs one of .*mh_pfedhn"),
        (
            {"generalization.join_round": 1, "generalization.novel_clients": 4,
             "data.num_clients": 4},
            "no training client",
        ),
    ],
)  # fmt: skip
def test_generalization_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("default", overrides)


def test_a_bad_novel_k_is_refused_before_it_waits(tiny_npz, tmp_path):
    cfg = resolve_config("default", run_config(tiny_npz, tmp_path))
    strategy = build_strategy(cfg)
    with pytest.raises(RegistrationError, match="positive integer"):
        strategy.admit(protocol.Identity("x", -3, role="novel"), 0)
    assert not strategy.novel.waiting


def test_the_run_plot_shows_novel_and_training_clients(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"round": r, "accuracy": 0.5, "training_accuracy": 0.6,
         "novel_accuracy": None if r < 2 else 0.1 * r}
        for r in range(5)
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_plot.main([str(run)]) == 0
    assert (run / "accuracy.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        run_plot.main([str(tmp_path / "missing")])
    with pytest.raises(SystemExit):  # several runs need --out
        run_plot.main([str(run), str(run)])
    assert run_plot.main([str(run), str(run), "--out", str(tmp_path / "both.png")]) == 0


def test_the_embedding_lr_probe_continues_one_trained_state(tiny_npz, tmp_path):
    from experiments import embedding_lr_probe

    sets = [f"{k}={v}" for k, v in run_config(tiny_npz, tmp_path).items() if k != "experiment"]
    args = ["1e-3", "0.1", "--experiment", "default", "--out", str(tmp_path / "probe")]
    assert embedding_lr_probe.main(args + [a for s in sets for a in ("--set", s)]) == 0
    curves = json.loads((tmp_path / "probe" / "embedding_lr_probe.json").read_text())
    assert set(curves) == {"0.001", "0.1"}
    for curve in curves.values():
        assert [c["round"] for c in curve] == [2, 3, 4]
    # both start from the same trained state: same training clients, same novel start
    assert curves["0.001"][0] == curves["0.1"][0]
