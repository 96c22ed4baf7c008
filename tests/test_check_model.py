"""`python -m client_app.check_model`: K, layers and τ of a site's model before it joins."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from client_app.check_model import ModelCheck, check_model, main
from client_app.session import model_layout
from common.models import MODEL_NAMES, build_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plug_in_model"


def _check(model: nn.Module, chunk_size: int = 3072, local=(), frozen=()) -> ModelCheck:
    return check_model(model, model_layout(model, local, frozen), chunk_size)


def test_lenet_has_the_zoo_table_k_and_five_layers():
    check = _check(build_model("lenet", num_classes=10, in_channels=3))
    assert (check.num_params, check.layers, check.tau) == (234_006, 5, 77)
    assert check.meets_recommendation


def test_a_small_model_is_warned_with_a_chunk_size_that_meets_the_recommendation(
    monkeypatch, capsys
):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    assert main(["site_models:small_cnn"]) == 0
    out = capsys.readouterr().out
    # conv (608), BatchNorm (16), linear (5,130): three layers, τ = ceil(5754 / 3072) = 2
    assert "K = 5,754" in out and "layers with parameters in the vector: 3" in out
    assert "warning: τ 2 is not above the 3 layers" in out and "at most 1,917" in out
    assert math.ceil(5754 / 1917) > 3 >= math.ceil(5754 / 1918)


def test_local_layers_leave_k_and_the_layer_count():
    model = build_model("resnet18", num_classes=10, in_channels=3)
    whole, split = _check(model), _check(model, local=["fc.*"])
    assert split.num_params == whole.num_params - (64 * 10 + 10) and split.kept_local == 650
    assert split.layers == whole.layers - 1


def test_frozen_backbone_parameters_are_not_counted():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    check = _check(model, chunk_size=5)
    assert (check.num_params, check.layers, check.tau) == (18, 1, 4)


def test_frozen_layers_stay_in_the_vector():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    check = _check(model, frozen=["0.*"])
    assert (check.num_params, check.layers) == (58, 2)


@given(st.integers(1, 10**7), st.integers(1, 500))
def test_largest_chunk_size_is_the_largest_that_meets_the_recommendation(k, layers):
    n = ModelCheck(k, 0, layers, 1).largest_chunk_size
    if n:
        assert math.ceil(k / n) > layers >= math.ceil(k / (n + 1))
    else:  # not even one parameter per chunk is enough
        assert k <= layers


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["nope:factory"], "cannot import module 'nope'"),
        (["lenet", "--local-layers", "nothing.*"], "match no parameter"),
        (["lenet", "--local-layers", "*"], "nothing to send"),
        (["no_such_model"], "unknown model"),
    ],
)
def test_bad_input_is_refused_with_the_reason(argv, says, capsys):
    assert main(argv) == 1
    assert says in capsys.readouterr().err


def test_a_chunk_size_below_one_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["lenet", "--chunk-size", "0"])
    assert exit_.value.code == 2 and "--chunk-size must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("channels", "classes"), [(3, 10), (1, 10), (3, 200)])
def test_every_zoo_model_meets_the_recommendation_at_the_default_chunk_size(
    name, channels, classes
):  # docs/concepts/hypernetwork.md says so
    assert _check(build_model(name, num_classes=classes, in_channels=channels)).meets_recommendation


def test_a_zoo_model_too_small_for_the_images_is_refused(capsys):
    """build_model checks only plug-in models on every build; the check runs a zoo one too."""
    assert main(["squeezenet1_0", "--image-size", "16"]) == 1
    assert "fails on a batch of the data's images" in capsys.readouterr().err
