"""End to end through Flower's own runtime: `flwr run` with the Ray simulation engine."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from server_app.outputs import read_metrics
from tests.flower_runtime import ROOT, flwr_run, private_flower


def simulate(mnist_npz, tmp_path, name: str, supernodes: int, *settings: str):
    """`flwr run` on 5% of MNIST with these run-config settings; (process, metrics rows)."""
    run_config = " ".join(
        [
            f'data.source="npz:{mnist_npz}"',
            "data.fraction=0.05",
            f'data.cache_dir="{tmp_path / "cache"}"',
            "client.epochs=1",
            f"server.min_nodes={supernodes}",
            f'server.output_root="{tmp_path / "out"}"',
            f'server.run_name="{name}"',
            *settings,
        ]
    )
    federation = f"num-supernodes={supernodes} client-resources-num-cpus=1"
    with private_flower(tmp_path / "flwr-home") as env:
        done = flwr_run(env, run_config, federation, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return log, read_metrics(tmp_path / "out" / name / "metrics.jsonl")


def test_the_app_package_holds_the_code_and_not_the_results(tmp_path):
    """`flwr run` ships the project as a FAB (at most 10 MB, sent to every SuperNode): the
    code and the configs go, the committed results and the docs stay (they once pushed it past
    Flower's limit, and every `flwr run` failed)."""
    flwr = str(Path(sys.executable).parent / "flwr")
    with private_flower(tmp_path / "flwr-home") as env:
        done = subprocess.run([flwr, "build", "--app", str(ROOT)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    fab = next(tmp_path.glob("*.fab"))
    names = zipfile.ZipFile(fab).namelist()
    assert {"server_app/round_loop.py", "client_app/app.py", "configs/default.yaml"} <= set(names)
    assert not [n for n in names if n.startswith(("results/", "docs/"))]
    assert fab.stat().st_size < 2 * 1024 * 1024


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mh_pfedhn", "mh_pfedhngd"])
def test_flwr_run_simulation_with_mixed_architectures(method, mnist_npz, tmp_path):
    log, rows = simulate(
        mnist_npz, tmp_path, "e2e", 4, f'method="{method}"', 'clients.models="lenet,mlp"',
        "rounds=2",
    )  # fmt: skip
    assert [r["round"] for r in rows] == [0, 1, 2], log[-4000:]
    assert rows[-1]["clients_trained"] == 4
    assert rows[-1]["clients_evaluated"] == 4
    assert rows[-1]["clients_in_flight"] == 1  # in_flight auto: the authors' round in simulation
    assert not rows[-1]["rejected"]
    assert 0.0 <= rows[-1]["accuracy"] <= 1.0
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    assert "[round 2/2]" in log
    assert f"done after round 2 | final accuracy {rows[-1]['accuracy']:.4f} (round 2)" in log
    if method == "mh_pfedhngd":  # both phases ran in every round
        assert rows[-1]["global_clients_trained"] == 4
        assert 0.0 <= rows[-1]["global_accuracy"] <= 1.0
        assert "global model" in log


@pytest.mark.slow
def test_flwr_run_novel_clients_and_a_novel_architecture(mnist_npz, tmp_path):
    """Paper 4.4 through Flower: 3 LeNet clients train the hypernetwork for 2 rounds; then a
    novel LeNet client and a novel MLP client (an architecture never seen: a new head) join
    and only they train, on the frozen hypernetwork."""
    log, rows = simulate(
        mnist_npz, tmp_path, "novel", 5,
        'clients.models="lenet"',
        "generalization.join_round=2",
        "generalization.novel_clients=2",
        'generalization.novel_models="lenet,mlp"',
        "rounds=3",
    )  # fmt: skip
    assert [r["round"] for r in rows] == [0, 1, 2, 3], log[-4000:]
    assert [r.get("clients_trained") for r in rows[1:]] == [3, 3, 2]
    assert [r["novel_clients"] for r in rows] == [0, 0, 2, 2]
    assert [r["training_clients"] for r in rows] == [3, 3, 3, 3]
    assert all(0.0 <= r["novel_accuracy"] <= 1.0 for r in rows[2:])
    assert not any(r["rejected"] for r in rows)
    assert "(new head)" in log and "hypernetwork frozen after round 2" in log


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "setting", "check"),
    [("fedavgm", "fedavgm.momentum=0.5", "momentum"), ("fedprox", "fedprox.mu=0.1", "mu")],
)
def test_flwr_run_the_worked_examples_with_their_own_settings(
    method, setting, check, mnist_npz, tmp_path
):
    """A method's own setting travels through Flower's run config (its key is declared in
    pyproject.toml from the schema) to the server and to every client."""
    log, rows = simulate(
        mnist_npz, tmp_path, method, 2, f'method="{method}"', 'clients.models="lenet"',
        setting, "rounds=1",
    )  # fmt: skip
    assert [r["round"] for r in rows] == [0, 1], log[-4000:]
    assert rows[-1]["clients_trained"] == 2 and not rows[-1]["rejected"]
    config = (tmp_path / "out" / method / "config.yaml").read_text()
    assert f"{check}: {setting.split('=')[1]}" in config


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedgh", "pefll"])
def test_flwr_run_baselines_with_message_fields_and_types_of_their_own(method, mnist_npz, tmp_path):
    """FedGH's prototype replies and PeFLL's own message types (`train.descriptor`,
    `train.embedgrad`) go through Flower's routing and serialisation."""
    models = 'clients.models="lenet,mlp"' if method == "fedgh" else 'clients.models="lenet"'
    log, rows = simulate(mnist_npz, tmp_path, method, 2, f'method="{method}"', models,
                         "rounds=1")  # fmt: skip
    assert [r["round"] for r in rows] == [0, 1], log[-4000:]
    assert rows[-1]["clients_trained"] == 2 and not rows[-1]["rejected"], log[-4000:]
    assert 0.0 <= rows[-1]["accuracy"] <= 1.0
