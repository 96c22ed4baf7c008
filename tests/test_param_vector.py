"""Flat parameter vectors (docs/concepts/protocol.md): layout, round trips, selection,
refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.models import MODEL_NAMES, build_model
from common.param_vector import (
    model_to_vector,
    select_parameter_names,
    vector_size,
    vector_to_model,
)


@pytest.fixture(scope="module")
def zoo() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: build_model(name, num_classes=10, in_channels=3) for name in MODEL_NAMES}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_round_trip(zoo, name: str) -> None:
    model = zoo[name]
    v = model_to_vector(model)
    assert v.dtype == torch.float32 and v.dim() == 1 and v.device.type == "cpu"
    assert not v.requires_grad
    assert v.numel() == vector_size(model)

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert not torch.equal(model_to_vector(model), v)
    vector_to_model(model, v)
    assert torch.equal(model_to_vector(model), v)

    r = torch.randn(v.numel(), generator=torch.Generator().manual_seed(1))
    vector_to_model(model, r)
    assert torch.equal(model_to_vector(model), r)
    vector_to_model(model, v.numpy())  # numpy input is accepted too
    assert torch.equal(model_to_vector(model), v)


def test_vector_is_a_copy() -> None:
    model = build_model("lenet", num_classes=10, in_channels=1)
    v = model_to_vector(model)
    v.zero_()
    assert model_to_vector(model).abs().sum() > 0


def test_layout_is_named_parameters_order() -> None:
    model = build_model("lenet", num_classes=10, in_channels=3)
    expected = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(model_to_vector(model), expected)
    # The order of `names` does not change the layout.
    names = select_parameter_names(model)
    assert torch.equal(model_to_vector(model, list(reversed(names))), expected)


def test_batchnorm_buffers_not_in_vector_and_untouched() -> None:
    model = build_model("resnet10", num_classes=10, in_channels=3)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))  # move the running statistics away from their init
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    assert any(n.endswith("running_mean") for n in buffers)
    assert any(n.endswith("num_batches_tracked") for n in buffers)

    k = vector_size(model)
    assert k == sum(p.numel() for p in model.parameters())
    assert k == 347178
    bn_affine = sum(
        m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    )
    assert bn_affine > 0  # BN weight and bias are parameters, so they are in K

    vector_to_model(model, torch.randn(k))
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n


def test_frozen_parameters_left_out() -> None:
    model = build_model("lenet", num_classes=10, in_channels=3)
    full = vector_size(model)
    model.features[0].weight.requires_grad_(False)
    assert "features.0.weight" not in select_parameter_names(model)
    assert vector_size(model) == full - model.features[0].weight.numel()


def test_selection_patterns() -> None:
    model = build_model("lenet", num_classes=10, in_channels=3)
    all_names = [n for n, _ in model.named_parameters()]
    assert select_parameter_names(model) == all_names

    last = model.classifier[-1]
    last_prefix = "classifier.5"
    assert dict(model.named_modules())[last_prefix] is last
    kept = select_parameter_names(model, exclude=[f"{last_prefix}.*"])
    assert vector_size(model, kept) == vector_size(model) - (64 * 10 + 10)
    assert kept == [n for n in all_names if not n.startswith(last_prefix)]

    conv = select_parameter_names(model, include=["features.*"])
    assert conv == ["features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias"]
    assert vector_size(model, conv) == (3 * 16 * 9 + 16) + (16 * 32 * 9 + 32)

    biases = select_parameter_names(model, include=["*.bias"], exclude=["features.*"])
    assert biases == ["classifier.1.bias", "classifier.3.bias", "classifier.5.bias"]

    with pytest.raises(ValueError, match="fc9"):
        select_parameter_names(model, include=["features.*", "fc9.*"])


def test_selected_round_trip_leaves_others_alone() -> None:
    model = build_model("lenet", num_classes=10, in_channels=3)
    names = select_parameter_names(model, exclude=["classifier.5.*"])
    before_last = model.classifier[5].weight.detach().clone()
    k = vector_size(model, names)
    r = torch.randn(k)
    vector_to_model(model, r, names)
    assert torch.equal(model_to_vector(model, names), r)
    assert torch.equal(model.classifier[5].weight, before_last)


def test_refusals() -> None:
    model = build_model("lenet", num_classes=10, in_channels=3)
    k = vector_size(model)
    with pytest.raises(ValueError, match=rf"expected {k}.*got {k - 1}"):
        vector_to_model(model, torch.zeros(k - 1))
    with pytest.raises(ValueError, match=rf"expected {k}.*got {k + 1}"):
        vector_to_model(model, np.zeros(k + 1, dtype=np.float32))
    with pytest.raises(ValueError, match="1-D"):
        vector_to_model(model, torch.zeros(1, k))
    with pytest.raises(ValueError, match="no_such"):
        vector_to_model(model, torch.zeros(10), ["no_such.weight"])
    with pytest.raises(ValueError, match="no_such"):
        vector_size(model, ["no_such.weight"])
    with pytest.raises(TypeError):
        vector_to_model(model, [0.0] * k)  # type: ignore[arg-type]
    before = model_to_vector(model)
    with pytest.raises(ValueError):
        vector_to_model(model, torch.zeros(k + 5))
    assert torch.equal(model_to_vector(model), before)  # a refused vector changes nothing


def test_dtype_conversion() -> None:
    model = build_model("mlp", num_classes=10, in_channels=1).double()
    v = model_to_vector(model)
    assert v.dtype == torch.float32
    vector_to_model(model, torch.ones(v.numel(), dtype=torch.float64))
    assert all(p.dtype == torch.float64 and bool((p == 1).all()) for p in model.parameters())


def test_empty_selection() -> None:
    model = build_model("lenet", num_classes=10, in_channels=3)
    assert model_to_vector(model, []).shape == (0,)
    vector_to_model(model, torch.zeros(0), [])
