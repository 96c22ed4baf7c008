"""Results and state that one client must not be able to forge (the review of 2026-12,
items 5-12): evaluation counts, the norm bound of a lone K, federation-wide values, memory,
tensor heads, a non-finite loss, log lines, tracker names. Each test fails on the code before
the fix (noted per test) and passes after."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from common import protocol
from server_app.defences import DeltaNormBound
from server_app.outputs import json_line
from tests.test_hardening import SIZE, app_with, honest_delta, proof_of, setup


def test_an_evaluation_with_a_forged_count_cannot_carry_the_pooled_accuracy():
    """Before: c0 claiming 10^12 examples, all correct, made the pooled accuracy ~1.0."""

    def forged(i, msg):
        if i == 0:
            return protocol.evaluate_reply(protocol.EvalResult(10**12, 10**12, 0.0))
        return protocol.evaluate_reply(protocol.EvalResult(10, 2, 20.0))

    strategy, grid = setup(app_with(evaluate=forged), rounds=1,
                           **{"server.fuse_evaluation": False})  # fmt: skip
    strategy.start(grid)
    accuracy = strategy.history[0]["accuracy"]
    assert accuracy < 0.75  # c0 weighs as 4 x the median count (10), not 10^12
    assert accuracy == pytest.approx((40 * 1.0 + 10 * 0.2 + 10 * 0.2) / 60)


def test_an_evaluation_count_that_changes_is_refused():
    def growing(i, msg):
        n = 10 if protocol.read_round(msg) == 0 or i else 1000  # c0 inflates from round 1
        return protocol.evaluate_reply(protocol.EvalResult(n, n // 2, 1.0))

    strategy, grid = setup(app_with(evaluate=growing), rounds=1,
                           **{"server.fuse_evaluation": False})  # fmt: skip
    strategy.start(grid)
    reasons = [r["reason"] for r in strategy.history[-1]["rejected"]]
    assert any("differ from the [10, 0]" in r for r in reasons)
    assert strategy.history[-1]["clients_evaluated"] == 2


def test_a_lone_k_is_bounded_by_everyones_deltas_from_its_first_one():
    """Before: a client with a K of its own was measured against itself only, so its first
    deltas passed unbounded (0 of 7 scaled with K=41 against 7 with K=40)."""
    bound = DeltaNormBound(2.0, warmup=3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        bound(rng.normal(0, 0.01, 40).astype(np.float32))
    attack = -1000 * rng.normal(0, 0.01, 41).astype(np.float32)
    bounded, scaled = bound(attack)
    assert scaled and np.linalg.norm(bounded) < np.linalg.norm(attack) / 100


def test_a_non_finite_train_loss_is_refused_and_rows_stay_strict_json():
    """Before: NaN/inf losses were accepted and written as bare NaN/Infinity."""

    def nan_loss(i, msg):
        if i == 0:
            return protocol.train_reply(honest_delta(protocol.read_theta(msg)), 10, float("nan"))
        return None

    strategy, grid = setup(app_with(train=nan_loss), rounds=1)
    strategy.start(grid)
    row = strategy.history[-1]
    assert row["clients_trained"] == 2
    assert any("train-loss is nan" in r["reason"] for r in row["rejected"])
    line = json_line({"train_loss": float("nan"), "x": [float("inf")], "y": {"z": 1.0}})
    assert json.loads(line) == {"train_loss": None, "x": [None], "y": {"z": 1.0}}


def test_a_clients_text_cannot_forge_a_log_line(caplog):
    """Before: an error reason with a newline wrote a fake `[round 1/1] accuracy` line."""
    forged = "boom\n[round 1/1] accuracy 0.9990 \x1b[31m"

    def failing(i, msg):
        if i == 0:
            raise RuntimeError(forged)
        return None

    strategy, grid = setup(app_with(train=failing), rounds=1)
    with caplog.at_level(logging.WARNING, logger="flwr.mh_pfedhn"):
        strategy.start(grid)
    assert not any(line.startswith("[round 1/1] accuracy 0.9990") for line in
                   caplog.text.splitlines())  # fmt: skip
    assert "boom\\n[round 1/1] accuracy 0.9990" in caplog.text  # escaped, on one line
    assert "\x1b" not in caplog.text  # a colour code is escaped or (in a reason) dropped
    # in-process, the client's traceback is logged too: each line marked with its node, escaped
    assert " | Traceback (most recent call last):" in caplog.text
    assert " | [round 1/1] accuracy 0.9990 \\x1b[31m" in caplog.text
    assert all(c.isprintable() for r in strategy.history[-1]["rejected"] for c in r["reason"])


def test_client_keys_become_distinct_and_always_valid_metric_names():
    """Before: `x/../y` was refused by MLflow (the tracker was dropped for the run) and
    `a+b` and `a_b` shared one series."""
    from server_app.tracking import _metric_name

    names = {k: _metric_name(k) for k in ("a+b", "a_b", "x/../y", "partition-3", "é" * 300)}
    assert len(set(names.values())) == len(names)
    assert names["partition-3"] == "partition-3" and names["a_b"] == "a_b"
    for name in names.values():
        assert ".." not in name and "/" not in name and len(name) <= 100
        assert all(c.isalnum() or c in "_-" for c in name)


def test_a_lone_first_client_cannot_set_the_federations_sizes():
    """Before: MH-pFedHNGD's K_g (and FedAvg's K) came from whoever registered first: one
    client reporting another K_g got every honest client refused."""

    def odd_first(i, msg):
        k_g = SIZE + 8 if i == 0 else SIZE  # node 1000, the first, lies
        return protocol.identity_reply(f"c{i}", SIZE, proof=proof_of(f"c{i}"),
                                       extras={protocol.GLOBAL_NUM_PARAMS: k_g})  # fmt: skip

    strategy, grid = setup(app_with(query=odd_first), nodes=3, method="mh_pfedhngd")
    strategy.discover(grid, 5)
    assert strategy.state.global_model.num_params == SIZE
    assert sorted(strategy.state.clients) == ["c1", "c2"]
    assert "K_g" in strategy.directory.refused[1000].reason
    fixed, grid = setup(app_with(query=odd_first), nodes=3, method="mh_pfedhngd",
                        **{"global_model.num_params": SIZE + 8})  # fmt: skip
    fixed.discover(grid, 5)  # the server's own setting wins over any majority
    assert fixed.state.global_model.num_params == SIZE + 8 and list(fixed.state.clients) == ["c0"]


def test_fedavgs_initial_vector_is_checked_like_a_delta():
    """Before: a first client's initial vector of 1e30 became everyone's w_0."""

    def huge(i, msg):
        initial = np.full(SIZE, 1e30 if i == 0 else 0.1, np.float32)
        return protocol.identity_reply(f"c{i}", SIZE, proof=proof_of(f"c{i}"),
                                       extras={protocol.INITIAL: initial})  # fmt: skip

    strategy, grid = setup(app_with(query=huge), method="fedavg")
    strategy.discover(grid, 5)
    assert "max_delta_abs" in strategy.directory.refused[1000].reason
    assert np.all(strategy.state.weights == np.float32(0.1))


def test_one_client_cannot_take_the_whole_memory_budget():
    """Before: a K of 30M was accepted (a 62 GB head) when the budget allowed it, and every
    later client needing a new head was refused."""
    from server_app.hypernetwork_server import HypernetworkServer, HypernetworkSettings

    settings = HypernetworkSettings(chunk_size=16, embedding_dim=4, hidden_dim=8)
    server = HypernetworkServer(settings, memory_budget=1e-3)  # 1 MB: a quarter per client
    with pytest.raises(ValueError, match="client_memory_gb"):
        server.register("greedy", 3000)  # 188 chunks: ~0.4 MB of head, over the 0.25 MB
    server.register("honest", 40)
    assert list(server.clients) == ["honest"]


def test_a_model_with_too_many_tensors_is_refused():
    """Before: 10,000 reported tensors made every pFedHN step 265x slower."""

    def many(i, msg):
        sizes = [1] * (SIZE if i else 2000)
        return protocol.identity_reply(f"c{i}", sum(sizes), proof=proof_of(f"c{i}"),
                                       extras={protocol.TENSOR_SIZES: sizes})  # fmt: skip

    strategy, grid = setup(app_with(query=many), method="pfedhn")
    strategy.discover(grid, 5)
    assert "1 to 1024" in strategy.directory.refused[1000].reason
    assert sorted(strategy.state.clients) == ["c1", "c2"]


def test_checkpoints_are_private_and_a_rehashed_forgery_is_refused(tmp_path):
    """Before: run folders were 0755 and checkpoint.pt 0644 (a reader regenerates every
    client's model), and the header was an unkeyed SHA-256: re-hashing a forged payload
    (a client key rebound to an attacker's secret) made it load."""
    import hashlib
    import stat

    from server_app.checkpoint import (
        CHECKPOINT_NAME,
        MAGIC,
        CheckpointError,
        checkpoint_key,
        load_checkpoint,
    )
    from server_app.methods.mh_pfedhn import MHpFedHN
    from tests.test_checkpoint import run

    key_file = tmp_path / "key"
    strategy = run(tmp_path, "private", rounds=1)
    folder = tmp_path / "private"
    path = folder / CHECKPOINT_NAME
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    payload = data[len(MAGIC) + 65 :].replace(b"partition", b"impostors")
    forged = MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
    path.write_bytes(forged)
    with pytest.raises(CheckpointError, match="authentication does not match"):
        load_checkpoint(path, MHpFedHN.state_class)
    path.write_bytes(data)
    assert load_checkpoint(path, MHpFedHN.state_class).round == 1
    with pytest.raises(CheckpointError, match="another server"):
        load_checkpoint(path, MHpFedHN.state_class, key=checkpoint_key(key_file))
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and strategy.history
