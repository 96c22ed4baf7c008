"""The model zoo of docs/concepts/models.md, K table included; a user's model is accepted."""

from __future__ import annotations

import importlib
import math
import sys
import textwrap

import pytest
import torch
from torch import nn

from common.models import MODEL_NAMES, PAPER_HETEROGENEOUS_MODELS, build_model
from common.param_vector import vector_size

# The K table of docs/concepts/models.md, typed in by hand: this table *is* the specification.
# model: (3ch 10cl, tau, 3ch 100cl, tau, 1ch 10cl, 1ch 62cl)
K_TABLE = {
    "lenet": (234006, 77, 239856, 79, 233718, 237098),
    "vgg8": (268814, 88, 274664, 90, 268526, 271906),
    "resnet10": (347178, 114, 353028, 115, 346890, 350270),
    "resnet12": (523242, 171, 529092, 173, 522954, 526334),
    "resnet18": (565386, 185, 571236, 186, 565098, 568478),
    "mlp": (402250, 131, 408100, 133, 140106, 143486),
    "squeezenet1_0": (740554, 242, 786724, 257, 731146, 757822),
    "squeezenet1_1": (727626, 237, 773796, 252, 726474, 753150),
}
COLUMNS = {(3, 10): 0, (3, 100): 2, (1, 10): 4, (1, 62): 5}
TAU_COLUMNS = {(3, 10): 1, (3, 100): 3}
N = 3072


def test_names() -> None:
    assert set(MODEL_NAMES) == set(K_TABLE)
    assert PAPER_HETEROGENEOUS_MODELS == ("lenet", "vgg8", "resnet10", "resnet12", "resnet18")
    assert set(PAPER_HETEROGENEOUS_MODELS) <= set(MODEL_NAMES)


@pytest.mark.parametrize("name", list(K_TABLE))
@pytest.mark.parametrize(("in_channels", "num_classes"), list(COLUMNS))
def test_k_matches_spec_table(name: str, in_channels: int, num_classes: int) -> None:
    model = build_model(name, num_classes=num_classes, in_channels=in_channels, image_size=32)
    k = vector_size(model)
    assert k == K_TABLE[name][COLUMNS[(in_channels, num_classes)]]
    if (in_channels, num_classes) in TAU_COLUMNS:
        assert math.ceil(k / N) == K_TABLE[name][TAU_COLUMNS[(in_channels, num_classes)]]


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward_shape(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_image_size_changes_flatten_only_where_it_should() -> None:
    x = torch.randn(2, 3, 64, 64)
    for name in ("lenet", "vgg8", "mlp", "resnet10"):
        model = build_model(name, num_classes=5, in_channels=3, image_size=64).eval()
        with torch.no_grad():
            assert model(x).shape == (2, 5)
    # Adaptive pooling: the ResNet's K does not depend on the image size.
    big_resnet = build_model("resnet10", num_classes=10, in_channels=3, image_size=64)
    assert vector_size(big_resnet) == K_TABLE["resnet10"][0]
    big_lenet = build_model("lenet", num_classes=10, in_channels=3, image_size=64)
    assert vector_size(big_lenet) > K_TABLE["lenet"][0]


def test_squeezenet_first_conv_keeps_geometry() -> None:
    for name in ("squeezenet1_0", "squeezenet1_1"):
        rgb = build_model(name, num_classes=10, in_channels=3).features[0]
        gray = build_model(name, num_classes=10, in_channels=1).features[0]
        assert gray.in_channels == 1
        for attr in ("out_channels", "kernel_size", "stride", "padding"):
            assert getattr(gray, attr) == getattr(rgb, attr)


def test_resnet_layout_follows_spec() -> None:
    model = build_model("resnet10", num_classes=10, in_channels=3)
    shortcuts = [m.shortcut for m in model.modules() if hasattr(m, "shortcut")]
    assert len(shortcuts) == 10
    convs = [s for s in shortcuts if isinstance(s, nn.Conv2d)]
    assert len(convs) == 2  # first block of stages 2 and 3
    assert all(c.bias is not None and c.stride == (2, 2) and c.kernel_size == (1, 1) for c in convs)
    vgg = build_model("vgg8", num_classes=10, in_channels=3)
    assert not any(isinstance(m, nn.Dropout) for m in vgg.modules())


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="resnet18") as info:
        build_model("resnet50", num_classes=10, in_channels=3)
    assert "package.module:factory" in str(info.value)


USER_MODULE = textwrap.dedent(
    """
    from torch import nn

    calls = []

    def make(num_classes, in_channels):
        calls.append((num_classes, in_channels))
        pool = nn.AdaptiveAvgPool2d(2)
        return nn.Sequential(pool, nn.Flatten(), nn.Linear(in_channels * 4, num_classes))

    def make_all(**kwargs):
        calls.append(dict(kwargs))
        linear = nn.Linear(kwargs["in_channels"], kwargs["num_classes"])
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)

    def five_outputs(in_channels):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, 5))

    def for_2x2_images(in_channels, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 4, num_classes))

    def with_batchnorm(in_channels, num_classes):
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

    def lazy(num_classes):
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    def wrong_names(n_classes, channels):
        return nn.Linear(channels, n_classes)

    def not_a_model(num_classes):
        return "nope"

    value = 3
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "mymod_zoo_test.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("mymod_zoo_test")
    yield module
    sys.modules.pop("mymod_zoo_test", None)


def test_user_model_from_import_path(user_module) -> None:
    model = build_model("mymod_zoo_test:make", num_classes=10, in_channels=3)
    assert isinstance(model, nn.Module)
    assert user_module.calls[-1] == (10, 3)  # image_size filtered out: make() does not take it
    assert vector_size(model) == 3 * 4 * 10 + 10
    assert model(torch.randn(2, 3, 2, 2)).shape == (2, 10)

    build_model("mymod_zoo_test:make_all", num_classes=4, in_channels=2, image_size=28)
    assert user_module.calls[-1] == {"num_classes": 4, "in_channels": 2, "image_size": 28}


def test_user_model_errors(user_module) -> None:
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        build_model("mymod_zoo_test:not_a_model", num_classes=10, in_channels=3)
    with pytest.raises(ValueError, match="no attribute"):
        build_model("mymod_zoo_test:missing", num_classes=10, in_channels=3)
    with pytest.raises(ValueError, match="not callable"):
        build_model("mymod_zoo_test:value", num_classes=10, in_channels=3)
    with pytest.raises(ImportError, match="no_such_pkg_xyz.mod:make"):
        build_model("no_such_pkg_xyz.mod:make", num_classes=10, in_channels=3)
    with pytest.raises(ValueError, match="package.module:factory"):
        build_model(":make", num_classes=10, in_channels=3)


def test_a_user_model_that_does_not_fit_the_data_is_refused_saying_why(user_module) -> None:
    """Another output width would train on silently (a logit per class is what the loss and
    the accuracy read); a model for other images fails on the data's; argument names the
    runner does not pass are named."""
    with pytest.raises(ValueError, match=r"to \(2, 5\), not \(2, 10\): one logit per class"):
        build_model("mymod_zoo_test:five_outputs", num_classes=10, in_channels=3)
    with pytest.raises(
        ValueError, match=r"fails on a batch of the data's images, shape \(2, 3, 32, 32\)"
    ):
        build_model("mymod_zoo_test:for_2x2_images", num_classes=10, in_channels=3)
    with pytest.raises(
        TypeError,
        match="requires n_classes, channels; a factory is called with "
        "any of num_classes, in_channels, image_size",
    ):
        build_model("mymod_zoo_test:wrong_names", num_classes=10, in_channels=3)


def test_checking_a_user_model_changes_nothing_in_it(user_module) -> None:
    model = build_model("mymod_zoo_test:with_batchnorm", num_classes=10, in_channels=3)
    batchnorm = model[1]
    assert model.training and int(batchnorm.num_batches_tracked) == 0
    assert torch.equal(batchnorm.running_mean, torch.zeros(4))


def test_a_lazy_user_model_has_its_size_at_every_build(user_module) -> None:
    sizes = [vector_size(build_model("mymod_zoo_test:lazy", num_classes=10, in_channels=3))
             for _ in range(2)]  # fmt: skip
    assert sizes == [3 * 32 * 32 * 10 + 10] * 2
