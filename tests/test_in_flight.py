"""Clients in flight (docs/concepts/schedules.md, "Clients in flight"): with
`hypernetwork.in_flight` c, one_by_one keeps c clients training; each delta is applied in the
seeded order at most c - 1 steps after its vector was generated; c = 1 is the authors' loop.

The scripted clients of tests/test_schedules.py return a delta that depends on the theta they
got, so a plain-PyTorch reimplementation of the definition can be compared bit for bit.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import pytest
import torch

from common.methods import METHODS
from server_app import hypernetwork_steps as steps
from server_app.generated_from import GeneratedFrom, values_at
from server_app.schedules import client_order
from simulation.grid import InProcessGrid
from tests.test_schedules import (
    authors_loop,
    local_delta,
    parameters,
    plain_copy,
    plain_weights,
    run,
)


def pipelined_loop(initial, rounds: int, in_flight: int, vjp_at: str) -> dict[str, torch.Tensor]:
    """The definition, in plain PyTorch on a copy of the initial weights: per round, in the
    seeded order, client j's vector is generated right after client j - c's step (the first
    c at the round's start); steps are taken in the order, each on the client's VJP at the
    current weights or at a copy of the weights its vector came from."""
    hnet, keys, embeddings, size, params, optimizer = plain_copy(initial)
    for server_round in range(1, rounds + 1):
        order = client_order(initial.seed, keys, server_round)
        sent: dict[str, tuple[np.ndarray, torch.nn.Module, torch.Tensor]] = {}

        def generate(key: str, sent: dict = sent) -> None:
            with torch.no_grad():
                theta = hnet(embeddings[key])[: size[key]].numpy().copy()
            sent[key] = (theta, copy.deepcopy(hnet), embeddings[key].detach().clone())

        for key in order[:in_flight]:
            generate(key)
        for j, key in enumerate(order):
            theta, old_hnet, old_embedding = sent.pop(key)
            delta = torch.from_numpy(local_delta(key, theta))
            if vjp_at == "current":
                weights = hnet(embeddings[key])[: size[key]]
                grads = torch.autograd.grad(weights, params, delta, allow_unused=True)
            else:
                old_embedding.requires_grad_(True)
                weights = old_hnet(old_embedding)[: size[key]]
                old = list(old_hnet.parameters())
                found = torch.autograd.grad(weights, [*old, old_embedding], delta,
                                            allow_unused=True)  # fmt: skip
                grads = [*found[: len(old)]] + [found[-1] if k == key else None for k in keys]
            optimizer.zero_grad(set_to_none=True)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            used = [p for p in params if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(used, initial.settings.grad_clip)
            optimizer.step()
            if j + in_flight < len(order):
                generate(order[j + in_flight])
    return plain_weights(hnet, embeddings)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def in_flight(c: int, vjp_at: str = "current") -> dict:
    return {"hypernetwork.in_flight": c, "hypernetwork.vjp_at": vjp_at}


@pytest.mark.parametrize("vjp_at", ["current", "generated"])
def test_one_client_in_flight_is_the_authors_loop_bit_for_bit(vjp_at):
    strategy, initial, _ = run("one_by_one", rounds=2, **in_flight(1, vjp_at))
    assert_same(parameters(strategy.state), authors_loop(initial, rounds=2))


@pytest.mark.parametrize("c", [2, 3, 5])
@pytest.mark.parametrize("vjp_at", ["current", "generated"])
def test_clients_in_flight_follow_the_definition_bit_for_bit(c, vjp_at):
    strategy, initial, _ = run("one_by_one", rounds=2, **in_flight(c, vjp_at))
    want = pipelined_loop(initial, 2, c, vjp_at)
    assert_same(parameters(strategy.state), want)
    # the test can fail: the authors' loop ends elsewhere
    authors = authors_loop(initial, rounds=2)
    assert not torch.equal(want["hnet.feature_extractor.0.weight"],
                           authors["hnet.feature_extractor.0.weight"])  # fmt: skip
    assert len(strategy.state.generated_from) == 0  # nothing kept once the round is over


@pytest.mark.parametrize("c", [5, 8])
def test_as_many_in_flight_as_clients_is_parallel_sequential(c):
    """Every client trains the round-start vector and the steps follow the seeded order."""
    strategy, _, _ = run("one_by_one", rounds=2, **in_flight(c))
    parallel, _, _ = run("parallel_sequential", rounds=2)
    assert_same(parameters(strategy.state), parameters(parallel.state))


@pytest.mark.parametrize("c", [1, 2, 3, 5])
def test_no_applied_delta_is_older_than_c_minus_1_steps(c):
    """Replaying the steps: client j's vector is the one generated after exactly
    max(0, j - c + 1) steps of the round, so j - that = min(j, c - 1) steps come between."""
    strategy, initial, received = run("one_by_one", rounds=1, **in_flight(c))
    order = client_order(initial.seed, sorted(initial.clients), 1)
    by_key = {key: theta for key, _, theta in received}
    assert sorted(by_key) == sorted(order)
    replay = copy.deepcopy(initial)
    states = [copy.deepcopy(replay)]
    for key in order:
        steps.step_client(replay, key, local_delta(key, by_key[key]))
        states.append(copy.deepcopy(replay))
    staleness = []
    for j, key in enumerate(order):
        made = [i for i, s in enumerate(states[: j + 1]) if
                np.array_equal(s.generate([key])[key], by_key[key])]  # fmt: skip
        assert made, f"{key}'s vector was generated from no state of the round"
        staleness.append(j - max(made))
    assert staleness == [min(j, c - 1) for j in range(len(order))]
    assert max(staleness) <= c - 1


class ShuffledGrid(InProcessGrid):
    """Replies arrive in a seeded random order, several pulls apart: a deployment's timing."""

    def __init__(self, *args, seed: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rng = np.random.default_rng(seed)
        self.hold: dict[str, int] = {}

    def push_messages(self, messages):
        ids = list(super().push_messages(messages))
        for message_id in ids:  # pulls until its reply is there, whoever asks
            self.hold[message_id] = int(self.rng.integers(0, 6))
        return ids

    def pull_messages(self, message_ids):
        ready = [i for i in message_ids if self.hold[i] == 0]
        for i in self.hold:
            self.hold[i] = max(self.hold[i] - 1, 0)
        return super().pull_messages(ready)


@pytest.mark.parametrize("vjp_at", ["current", "generated"])
def test_the_order_replies_arrive_in_changes_nothing(vjp_at, monkeypatch):
    monkeypatch.setattr("server_app.exchange.time.sleep", lambda s: None)
    plain, _, _ = run("one_by_one", rounds=2, **in_flight(3, vjp_at))
    for seed in (1, 2):
        shuffled_grid = lambda *a, seed=seed, **k: ShuffledGrid(*a, seed=seed, **k)  # noqa: E731
        monkeypatch.setattr("tests.test_schedules.InProcessGrid", shuffled_grid)
        shuffled, _, _ = run("one_by_one", rounds=2, **in_flight(3, vjp_at))
        assert_same(parameters(shuffled.state), parameters(plain.state))


def test_the_kept_values_are_shared_and_released():
    """Clients generated between the same two steps share the kept tensors; taking a
    client's values forgets them; values_at puts the live values back even on an error."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(2))
    kept = GeneratedFrom()
    kept.remember("x", [a, b])
    kept.remember("y", [a])
    assert len(kept) == 2  # a once, b once
    kept.stepped()
    with torch.no_grad():
        a.add_(1.0)
    kept.remember("z", [a])
    assert len(kept) == 3  # a's new value is another tensor
    x = kept.take("x")
    assert torch.equal(x[a], torch.ones(3)) and len(kept) == 2  # b freed; y holds old a
    kept.take("y")
    assert len(kept) == 1 and kept.take("y") is None
    with pytest.raises(RuntimeError), values_at({a: torch.zeros(3)}):
        assert torch.equal(a, torch.zeros(3))
        raise RuntimeError
    assert torch.equal(a, torch.full((3,), 2.0))
    kept.clear()
    assert len(kept) == 0


def test_in_flight_must_be_positive():
    from common.config import ConfigError, resolve_config

    with pytest.raises(ConfigError, match="in_flight"):
        resolve_config("default", {"hypernetwork.in_flight": 0})


@pytest.mark.parametrize("method", ["mh_pfedhn", "mh_pfedhngd_no_distill", "mh_pfedhngd"])
def test_the_batched_engine_trains_the_clients_in_flight_together(
    method, tiny_npz, tmp_path, monkeypatch
):
    """3 of 4 clients train per round, 2 in flight: the real ClientApp's plain jobs reach the
    batched trainer as a group of 2, then 1 (phase 1 of MH-pFedHNGD: all 3 at once); the rows
    equal the loop engine's, and every round had 2 clients in flight (phase 2 included)."""
    from simulation import batched_grid
    from tests.test_every_method import run as run_method

    groups: list[int] = []
    train_together = batched_grid.train_together

    def spy(models, *args, **kwargs):
        groups.append(len(models))
        return train_together(models, *args, **kwargs)

    monkeypatch.setattr(batched_grid, "train_together", spy)
    flight = in_flight(2, "generated")
    loop = run_method(method, tiny_npz, tmp_path, "loop", 2, **flight)
    assert groups == []
    batched = run_method(method, tiny_npz, tmp_path, "batched", 2, engine="batched", **flight)
    assert batched == loop
    assert [r["clients_in_flight"] for r in loop[1:]] == [2, 2]
    phase2 = [] if method == "mh_pfedhngd" else [2, 1]  # distilling jobs go one by one
    phase1 = [] if method == "mh_pfedhn" else [3]
    assert groups == (phase1 + phase2) * 2


@pytest.mark.parametrize("method", sorted(n for n, m in METHODS.items() if m.schedules))
def test_every_scheduled_method_runs_with_clients_in_flight(method, tiny_npz, tmp_path):
    """pFedHN, pFedLHN, pFedLA and the MH family keep 2 clients in flight with partial
    participation on the real ClientApp, and nothing is refused."""
    from tests.test_every_method import run as run_method

    rows = run_method(method, tiny_npz, tmp_path, "flight", 2, **in_flight(2, "generated"))
    assert [r["clients_in_flight"] for r in rows[1:]] == [2, 2]
    assert all(r["clients_trained"] == 3 and not r["rejected"] for r in rows[1:]), rows


def test_the_deployed_round_model():
    """n sites, exchange E, server step S: one at a time costs n(E + S) + E (the evaluation);
    all at once E + nS + E; the server's steps bound how fast any c can be."""
    from experiments.in_flight_deployed import modelled_round_seconds

    assert modelled_round_seconds(50, 1, 3.0, 0.1) == pytest.approx(50 * 3.1 + 3.0)
    assert modelled_round_seconds(50, 50, 3.0, 0.1) == pytest.approx(3.0 + 5.0 + 3.0)
    times = [modelled_round_seconds(50, c, 3.0, 0.1) for c in (1, 5, 10, 25, 50)]
    assert times == sorted(times, reverse=True)
    # waves of 10: each starts when the first of the wave before is stepped (3.1 s apart);
    # the last wave's 10 steps end 3.1 * 5 + 0.9 s in, then the evaluation
    assert modelled_round_seconds(50, 10, 3.0, 0.1) == pytest.approx(3.1 * 5 + 0.9 + 3.0)


@pytest.mark.parametrize("bad", ["10:2,5", "10:1,11", "10:1,x", "ten:1", "10"])
def test_model_sites_without_c_1_or_out_of_range_are_refused_before_any_run(bad, capsys):
    """The table divides by c = 1: without it the measurement (minutes of clusters) was lost
    at the end, on a KeyError."""
    from experiments.in_flight_deployed import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model-sites", bad])
    assert exit_.value.code == 2 and "--model-sites" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["deployment_benchmark", "in_flight_deployed"])
@pytest.mark.parametrize(("bad", "says"), [
    ("client.lrr=0.1", "did you mean 'client.lr'"),
    ("rounds=5", "given by the script's own options"),  # --rounds would be recorded
    ("experiment=other", "given by the script's own options"),
    ("clients.local_layers=[fc3.weight, fc3.bias]", "must be a bool, int, float or string"),
    ("server.max_delta_abs=.inf", "not a finite number"),
    ('tracking.experiment=a"b', "invalid format"),  # Flower's run-config parser refuses it
    ("generalization.join_round=9", "join_round"),  # valid alone, not with the runs' rounds
])  # fmt: skip
def test_a_bad_set_is_refused_before_any_cluster_starts(
    module, bad, says, capsys, monkeypatch, tmp_path
):
    """Each would have failed in a server after minutes of other measured runs. The refused
    command leaves no output folder behind, named or default."""
    import importlib
    import tempfile

    script = importlib.import_module(f"experiments.{module}")
    monkeypatch.setattr(script, "run_on_cluster", lambda *a, **k: pytest.fail("a cluster ran"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    for out in (["--out", str(tmp_path / "out")], []):
        with pytest.raises(SystemExit) as exit_:
            script.main(["--set", bad, *out])
        assert exit_.value.code == 2
        assert says in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
    assert not any((tmp_path / "tmp").iterdir())


def test_set_reaches_the_measured_runs_but_not_over_a_variants_own_settings(tmp_path):
    from experiments.deployment_benchmark import VARIANTS, add_cluster_options, settings

    parser = argparse.ArgumentParser()
    add_cluster_options(parser, clients=3, rounds=3)
    args = parser.parse_args(["--set", "preset=paper_text", "--set", "hypernetwork.schedule=x"])
    one_by_one = settings(args, tmp_path, "fast-one-by-one", VARIANTS["fast-one-by-one"][0])
    assert one_by_one["preset"] == "paper_text"
    assert one_by_one["hypernetwork.schedule"] == "one_by_one"
    assert settings(args, tmp_path, "fast", {})["hypernetwork.schedule"] == "x"


class Interrupted(RuntimeError):
    pass


@pytest.mark.parametrize("vjp_at", ["current", "generated"])
def test_a_run_interrupted_mid_round_resumes_bit_for_bit(vjp_at, tiny_npz, tmp_path, monkeypatch):
    """The server dies while round 2's clients are in flight (at its third train message,
    after the first delta was applied); resumed from round 1's checkpoint, with the clients'
    state as it was then, the run ends exactly where an uninterrupted one does."""
    from common import protocol
    from tests import test_schedule_features as features

    class DiesInRoundTwo(InProcessGrid):
        sent = 0

        def push_messages(self, messages):
            messages = list(messages)
            if any(m.metadata.message_type == protocol.TRAIN and protocol.read_round(m) == 2
                   for m in messages):  # fmt: skip
                DiesInRoundTwo.sent += 1
                if DiesInRoundTwo.sent == 3:
                    raise Interrupted
            return super().push_messages(messages)

    flight = {**in_flight(2, vjp_at), "server.checkpoint_every": 1}
    whole = features.run(tiny_npz, tmp_path, "one_by_one", "whole", rounds=4, **flight).history
    monkeypatch.setattr(features, "InProcessGrid", DiesInRoundTwo)
    with pytest.raises(Interrupted):
        features.run(tiny_npz, tmp_path, "one_by_one", "split", rounds=4, **flight)
    monkeypatch.undo()
    resume = {"server.resume": str(tmp_path / "out" / "split")}
    split = features.run(tiny_npz, tmp_path, "one_by_one", "split", rounds=4, **flight,
                         **resume).history  # fmt: skip
    strip = [{k: v for k, v in r.items() if k not in features.TIMING} for r in split]
    assert strip == [{k: v for k, v in r.items() if k not in features.TIMING} for r in whole]


def test_auto_keeps_the_authors_round_in_simulation_and_sites_busy_when_deployed():
    """`hypernetwork.in_flight: auto`: 1 on the in-process grid and Flower's simulation engine,
    DEPLOYED_IN_FLIGHT on any other grid (Flower's deployment runtime)."""
    from flwr.superlink.grid import InMemoryGrid

    from common.config import DEPLOYED_IN_FLIGHT, resolve_config
    from server_app.round_loop import NodesView, deployed
    from server_app.run import build_strategy

    class RemoteGrid(InProcessGrid):
        simulated = False

    memory = InMemoryGrid.__new__(InMemoryGrid)  # only its type matters here
    assert not deployed(memory) and not deployed(InProcessGrid(None, [], {}))
    assert deployed(RemoteGrid(None, [], {}))
    assert deployed(NodesView(RemoteGrid(None, [], {}), []))
    cfg = resolve_config("default", {"rounds": 1})
    assert cfg.hypernetwork.in_flight == "auto"
    strategy = build_strategy(cfg)
    strategy.choose_in_flight(InProcessGrid(None, [], {}))
    assert strategy.schedule.in_flight == 1
    strategy.choose_in_flight(RemoteGrid(None, [], {}))
    assert strategy.schedule.in_flight == DEPLOYED_IN_FLIGHT
    pinned = build_strategy(resolve_config("default", {"preset": "paper"}))
    pinned.choose_in_flight(RemoteGrid(None, [], {}))
    assert pinned.schedule.in_flight == 1  # the paper preset keeps the authors' round
