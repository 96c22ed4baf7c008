"""Experiment configuration: YAML files, presets, Flower run-config overrides, clear errors."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from common.config import (
    CONFIG_DIR,
    ConfigError,
    config_from_run_config,
    defining_settings,
    leaf_keys,
    resolve_config,
    settings_changed,
)

ROOT = Path(__file__).resolve().parents[1]


def pyproject_run_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_declares_every_setting_so_flwr_run_can_override_it():
    """The key list is written from the schema and every method's settings; a setting added
    without running the sync command fails here, saying which command to run."""
    declared = pyproject_run_config()
    stale = "pyproject.toml is stale: run python -m common.generated --write"
    assert set(declared) == {"experiment", *leaf_keys()}, stale
    assert all(value == "" for key, value in declared.items() if key != "experiment")
    assert {"fedavgm.momentum", "fedprox.mu", "global_model.teacher"} <= set(declared)


def test_a_methods_own_settings_are_validated_naming_the_key():
    one = {"clients.models": "lenet"}
    cfg = resolve_config("default", {"method": "fedavgm", "fedavgm.momentum": 0.5, **one})
    assert cfg.method_settings.momentum == 0.5
    assert resolve_config("default", {"method": "fedprox", **one}).method_settings.mu == 0.01
    assert resolve_config("default").method_settings is None  # mh_pfedhn declares none
    with pytest.raises(ConfigError, match=r"fedavgm\.momentum: Input should be less than 1"):
        resolve_config("default", {"method": "fedavgm", "fedavgm.momentum": 1.5})
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['fedprox\.nu'\]"):
        resolve_config("default", {"method": "fedprox", "fedprox.nu": 1})
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['fedproxx'\]"):
        resolve_config("default", {"fedproxx": {"mu": 1}})
    # another method's section is checked too (a typo there would otherwise wait silently)
    with pytest.raises(ConfigError, match=r"fedprox\.mu"):
        resolve_config("default", {"method": "fedavg", "fedprox.mu": -1})


def test_a_method_section_in_a_yaml_file_is_checked_by_its_model(tmp_path):
    path = tmp_path / "prox.yaml"
    path.write_text("method: fedprox\nfedprox: {nu: 1}\n")
    with pytest.raises(ConfigError, match=r"fedprox\.nu: Extra inputs are not permitted"):
        resolve_config(str(path))


def test_the_declared_run_config_resolves_to_the_default_experiment():
    cfg = config_from_run_config(pyproject_run_config())
    assert cfg == resolve_config("default")


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_experiment_is_valid(path):
    cfg = resolve_config(path.stem)
    assert cfg.name == path.stem


def test_spec_defaults():
    cfg = resolve_config("cifar10_heterogeneous")
    assert cfg.clients.models == ["lenet", "vgg8", "resnet10", "resnet12", "resnet18"]
    # the authors' command-line client settings, chosen by measurement (issue 25)
    assert (cfg.client.lr, cfg.client.momentum, cfg.client.weight_decay) == (5e-3, 0.9, 5e-4)
    assert (cfg.client.batch_size, cfg.client.epochs, cfg.client.grad_clip) == (64, 1, 50.0)
    h = cfg.hypernetwork
    assert (h.chunk_size, h.embedding_dim, h.hidden_dim, h.hidden_layers) == (3072, 64, 128, 3)
    assert (h.embedding_std, h.lr, h.grad_clip) == (1.0, 2e-4, 50.0)
    assert h.schedule == "one_by_one"
    assert cfg.server.max_params == 50_000_000
    assert cfg.data.train_fraction == 0.75


def test_paper_preset_keeps_the_authors_code_settings():
    cfg = resolve_config("cifar10_homogeneous", {"preset": "paper"})
    assert cfg.hypernetwork.embedding_std == 0.002
    assert (cfg.client.lr, cfg.client.weight_decay, cfg.client.epochs) == (5e-3, 5e-4, 1)
    assert cfg.hypernetwork.in_flight == 1  # the authors' order, one client at a time


def test_paper_text_preset_keeps_the_texts_client_settings():
    cfg = resolve_config("cifar10_homogeneous", {"preset": "paper_text"})
    assert (cfg.client.lr, cfg.client.weight_decay, cfg.client.epochs) == (1e-3, 1e-4, 2)
    assert cfg.hypernetwork.embedding_std == 1.0


def test_run_config_overrides_win_and_empty_values_keep_the_yaml():
    run_config = {
        **pyproject_run_config(),
        "experiment": "cifar10_heterogeneous",
        "preset": "paper_text",
        "client.lr": 0.02,
        "clients.models": "lenet,mlp",
        "rounds": 7,
    }
    cfg = config_from_run_config(run_config)
    assert cfg.client.lr == 0.02  # override beats the preset
    assert cfg.client.epochs == 2  # preset beats the schema default
    assert cfg.clients.models == ["lenet", "mlp"]
    assert cfg.rounds == 7
    assert cfg.data.source == "cifar10"


def test_a_misspelt_key_is_named_with_the_keys_it_was_probably_meant_to_be():
    with pytest.raises(ConfigError) as err:
        resolve_config("default", {"hypernetwork.embeding_std": 1})
    message = str(err.value)
    assert "did you mean 'hypernetwork.embedding_std'" in message
    assert "'hypernetwork.lr'" in message and "'client.lr'" not in message  # its section only
    with pytest.raises(ConfigError) as err:  # another method's `mu` may be suggested too
        resolve_config("default", {"fedproxx.mu": 1})
    assert re.search(r"did you mean [^?]*'fedprox.mu'[^?]*\? the top-level keys", str(err.value))


def test_another_methods_setting_is_checked_then_left_out_of_a_run():
    """A sweep's `--set fedprox.mu=...` reaches its Local runs: it is validated there but
    neither kept nor able to tell two Local runs apart (a resume, the report's rows)."""
    local = resolve_config("default", {"method": "local", "fedprox.mu": 0.5})
    assert "fedprox" not in local.model_dump() and local.method_settings is None
    with pytest.raises(ConfigError, match="fedprox.mu"):
        resolve_config("default", {"method": "local", "fedprox.mu": -1})
    fedprox = resolve_config(
        "default", {"method": "fedprox", "fedprox.mu": 0.5, "clients.models": ["lenet"]}
    )
    assert fedprox.method_settings.mu == 0.5
    plain = resolve_config("default", {"method": "local"})
    assert settings_changed(defining_settings(local), plain) == []
    older_dump = {**plain.model_dump(mode="json"), "fedprox": {"mu": 0.5}}  # kept it once
    assert defining_settings(older_dump) == defining_settings(plain)
    assert settings_changed(defining_settings(older_dump), plain) == []


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=30))
def test_any_unknown_key_is_refused_by_name(key):
    assume(key not in leaf_keys() and key != "experiment")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \[" + re.escape(repr(key))):
        resolve_config("default", {key: 1})


def test_a_one_architecture_method_takes_one_model_named_any_number_of_times():
    cfg = resolve_config("default", {"method": "pfedla", "clients.models": "lenet,lenet"})
    assert cfg.clients.models == ["lenet", "lenet"]


def test_an_experiment_can_be_a_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nrounds: 3\ndata: {source: 'npz:/x.npz'}\n")
    cfg = resolve_config(str(path))
    assert (cfg.name, cfg.rounds, cfg.data.source) == ("mine", 3, "npz:/x.npz")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"client.lrr": 1}, "unknown setting"),
        ({"client.lr": -1}, "client.lr"),
        ({"hypernetwork.schedule": "parallel"}, "schedule"),
        ({"hypernetwork.update_mode": "batched"}, "is now hypernetwork.schedule"),
        ({"data.partitioner": "dirichlet"}, "partitioner"),
        ({"data.normalize": "None"}, r"data\.normalize: Input should be 'auto' or 'none'"),
        ({"preset": "fast"}, "unknown preset"),
        (
            {"method": "fedavg"},
            r"fedavg trains one architecture, but clients.models gives 2 "
            r"\(lenet, mlp\): set clients.models to one of them, e.g. clients.models=lenet",
        ),
        ({"method": "pefll", "clients.models": "lenet,vgg8"}, "pefll trains one architecture"),
    ],
)
def test_bad_settings_are_refused_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("default", overrides)


def test_unknown_experiment_lists_the_available_ones():
    with pytest.raises(ConfigError, match="cifar10_heterogeneous"):
        resolve_config("nope")


def test_unknown_yaml_key_is_refused(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("client: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        resolve_config(str(path))


def test_gd_experiments_extend_their_mh_pfedhn_setup():
    gd = resolve_config("cifar10_heterogeneous_gd")
    base = resolve_config("cifar10_heterogeneous")
    assert gd.method == "mh_pfedhngd" and gd.method_spec.strategy_class().distills
    assert gd.clients == base.clients and gd.data == base.data and gd.rounds == base.rounds
    g = gd.global_model
    assert (g.architecture, g.distill_weight, g.temperature, g.teacher, g.fraction) == (
        "lenet",
        0.01,
        15.0,
        "round_start",
        1.0,
    )
    ablation = resolve_config("cifar10_heterogeneous_gd", {"method": "mh_pfedhngd_no_distill"})
    assert not ablation.method_spec.strategy_class().distills
    assert ablation.global_model == g  # the same settings section
    with pytest.raises(ConfigError, match="mh_pfedhng' is now called 'mh_pfedhngd_no_distill"):
        resolve_config("cifar10_heterogeneous_gd", {"method": "mh_pfedhng"})


def test_extends_loops_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text(f"extends: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"extends: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="loop"):
        resolve_config(str(tmp_path / "a.yaml"))
