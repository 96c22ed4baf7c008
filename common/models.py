"""The model zoo (docs/concepts/models.md) and the hook for a user's own model.

Each client builds its architecture locally and only ever reports K (its vector size) to the
server, so these definitions must reproduce the paper's parameter counts exactly: the tests pin
them to the K table of docs/concepts/models.md.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "MODEL_NAMES",
    "PAPER_HETEROGENEOUS_MODELS",
    "BasicBlock",
    "CifarResNet",
    "LeNet",
    "MLP",
    "VGG8",
    "build_model",
]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)


class LeNet(nn.Module):
    """Paper Table 16. Two 2x2 poolings shrink the image by 4 per side before the first FC."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int = 32) -> None:
        super().__init__()
        side = image_size // 4
        self.features = nn.Sequential(
            _conv3x3(in_channels, 16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            _conv3x3(16, 32), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * side * side, 108), nn.ReLU(inplace=True),
            nn.Linear(108, 64), nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class VGG8(nn.Module):
    """Paper Table 18: six convolutions and three FC layers, no dropout (the paper lists none)."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int = 32) -> None:
        super().__init__()
        side = image_size // 8
        self.features = nn.Sequential(
            _conv3x3(in_channels, 16), nn.ReLU(inplace=True),
            _conv3x3(16, 16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            _conv3x3(16, 32), nn.ReLU(inplace=True),
            _conv3x3(32, 32), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            _conv3x3(32, 64), nn.ReLU(inplace=True),
            _conv3x3(64, 64), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 180), nn.ReLU(inplace=True),
            nn.Linear(180, 64), nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Paper Table 17. Its K depends on the input size, so grayscale clients are much smaller."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, 128), nn.ReLU(inplace=True),
            nn.Linear(128, 64), nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """The authors' block: biased convolutions, and a biased 1x1 shortcut without BatchNorm.

    This differs from torchvision's ResNet block (no conv bias, BN on the shortcut); the biases
    are what make K match the paper's Table 20.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Paper Table 19: CIFAR-style ResNet with stages of width 16/32/64.

    ``blocks_per_stage`` is the only thing that tells resnet10/12/18 apart. Pooling is adaptive
    so any ``image_size`` works without changing K.
    """

    def __init__(
        self,
        blocks_per_stage: tuple[int, int, int],
        num_classes: int,
        in_channels: int,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        del image_size  # adaptive pooling makes the size irrelevant to the layout
        # The stem conv keeps its bias although BN follows: the authors' model has it, and
        # the K table (docs/concepts/models.md) only matches with it (16 parameters).
        self.stem = nn.Sequential(
            _conv3x3(in_channels, 16),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        width_in = 16
        for index, (width, blocks) in enumerate(zip((16, 32, 64), blocks_per_stage, strict=True)):
            first_stride = 1 if index == 0 else 2
            layers = []
            for b in range(blocks):
                layers.append(BasicBlock(width_in, width, first_stride if b == 0 else 1))
                width_in = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(out, 1))


def _squeezenet(version: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int = 32) -> nn.Module:
        # imported here: torchvision's import (with torch._dynamo) takes seconds, and a
        # deployed ClientApp is a fresh process for every message
        import torchvision.models

        del image_size  # torchvision's classifier pools adaptively
        factory = getattr(torchvision.models, f"squeezenet{version}")
        model = factory(weights=None, num_classes=num_classes)
        if in_channels != 3:
            # Keep the geometry of torchvision's first conv so only the input width changes.
            old = model.features[0]
            model.features[0] = nn.Conv2d(
                in_channels,
                old.out_channels,
                kernel_size=old.kernel_size,
                stride=old.stride,
                padding=old.padding,
                bias=old.bias is not None,
            )
        return model

    return build


def _resnet(blocks: tuple[int, int, int]) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int = 32) -> nn.Module:
        return CifarResNet(blocks, num_classes, in_channels, image_size)

    return build


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet,
    "vgg8": VGG8,
    "mlp": MLP,
    "resnet10": _resnet((3, 3, 4)),
    "resnet12": _resnet((1, 5, 6)),
    "resnet18": _resnet((6, 6, 6)),
    "squeezenet1_0": _squeezenet("1_0"),
    "squeezenet1_1": _squeezenet("1_1"),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)
PAPER_HETEROGENEOUS_MODELS: tuple[str, ...] = ("lenet", "vgg8", "resnet10", "resnet12", "resnet18")


def _load_factory(path: str) -> Callable[..., object]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model import path {path!r} must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"cannot import module {module_name!r} for model {path!r}: {exc}"
        ) from exc
    factory: object = module
    for part in attr.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise ValueError(
                f"module {module_name!r} has no attribute {attr!r} (model {path!r})"
            ) from None
    if not callable(factory):
        raise ValueError(f"model factory {path!r} is not callable")
    return factory


def _call_with_accepted_kwargs(
    path: str, factory: Callable[..., object], kwargs: dict[str, int]
) -> object:
    """Pass only the keywords the factory declares, so a user's factory needs no unused args;
    one that requires another argument is refused naming the ones it can have."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: pass everything
        return factory(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return factory(**kwargs)
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    empty = inspect.Parameter.empty
    required = [p.name for p in params if p.default is empty and p.kind in named
                and p.name not in kwargs]  # fmt: skip
    if required:
        raise TypeError(
            f"model factory {path!r} requires {', '.join(required)}; a factory is called "
            f"with any of {', '.join(kwargs)} (by keyword), the others need defaults"
        )
    accepted = {p.name for p in params if p.kind in named}
    return factory(**{k: v for k, v in kwargs.items() if k in accepted})


def check_fits_the_data(path: str, model: nn.Module, kwargs: dict[str, int]) -> None:
    """A plug-in model must map a batch of the data's images to one logit per class: with
    another width it would train on without an error (or fail inside the loss). Run on every
    build (a forward of two blank images), this also initialises lazy layers, whose K is
    unknown until then."""
    size = kwargs["image_size"]
    shape = (2, kwargs["in_channels"], size, size)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape))
    except Exception as err:
        raise ValueError(
            f"model {path!r} fails on a batch of the data's images, "
            f"shape {shape}: {type(err).__name__}: {err}"
        ) from None
    finally:
        model.train(training)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (2, kwargs["num_classes"]):
        raise ValueError(
            f"model {path!r} maps a batch of shape {shape} to {got}, not "
            f"(2, {kwargs['num_classes']}): one logit per class of the data (num_classes)"
        )


def build_model(
    name: str, *, num_classes: int, in_channels: int, image_size: int = 32
) -> nn.Module:
    """Build a zoo model by name, or a user's model from ``"package.module:factory"``.

    The import-path form lets a client bring an architecture the server has never heard of: the
    server only ever learns its K.
    """
    kwargs = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    if ":" in name:
        model = _call_with_accepted_kwargs(name, _load_factory(name), kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module"
            )
        check_fits_the_data(name, model, kwargs)
        return model
    builder = _REGISTRY.get(name)
    if builder is None:
        raise ValueError(
            f"unknown model {name!r}; valid names are {', '.join(MODEL_NAMES)}, "
            "or an import path 'package.module:factory' for your own model"
        )
    return builder(**kwargs)
