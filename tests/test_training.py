"""The client's own SGD: the same floats as torch.optim.SGD, and no torch._dynamo import (which
costs seconds in every fresh deployed ClientApp process)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from client_app.training import MomentumSGD


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.9, 1e-4), (0.9, 0.0), (0.0, 5e-4)])
def test_momentum_sgd_matches_torch_sgd_step_for_step(momentum, weight_decay):
    torch.manual_seed(0)
    ours, theirs = nn.Linear(7, 3), nn.Linear(7, 3)
    theirs.load_state_dict(ours.state_dict())
    mine = MomentumSGD(list(ours.parameters()), 0.05, momentum, weight_decay)
    reference = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=momentum,
                                weight_decay=weight_decay)  # fmt: skip
    for step in range(5):
        x, y = torch.randn(16, 7), torch.randint(0, 3, (16,))
        for model, opt in ((ours, mine), (theirs, reference)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert torch.equal(a, b), step


def test_training_a_client_model_does_not_import_dynamo():
    code = (
        "import sys, torch\n"
        "from client_app.training import SGDSettings, train_sgd\n"
        "from common.models import build_model\n"
        "m = build_model('lenet', num_classes=10, in_channels=1, image_size=28)\n"
        "train_sgd(m, torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)),\n"
        "          SGDSettings(epochs=1), torch.Generator().manual_seed(0))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("architecture", ["lenet", "resnet10"])
def test_channels_last_and_contiguous_training_agree_up_to_float_rounding(architecture):
    """The memory format changes how convolutions sum, not what they compute: the same
    forward pass and the same SGD step agree up to float rounding. (Over several steps a
    ResNet amplifies rounding chaotically, the same whichever layout: contiguous float32
    itself drifts ~1e-3 from float64 in three steps; so one step is compared.)"""
    from client_app.training import SGDSettings, evaluate, memory_format_for, train_sgd
    from common.models import build_model
    from common.param_vector import model_to_vector

    torch.manual_seed(0)
    x, y = torch.randn(48, 3, 32, 32), torch.randint(0, 10, (48,))
    out = {}
    for layout in ("contiguous", "channels_last"):
        torch.manual_seed(1)
        model = build_model(architecture, num_classes=10, in_channels=3, image_size=32)
        start = model_to_vector(model)
        correct, loss_sum = evaluate(model, x, y, memory_format=layout)
        settings = SGDSettings(lr=0.01, epochs=1, batch_size=48, memory_format=layout)
        loss = train_sgd(model, x, y, settings, torch.Generator().manual_seed(2))
        out[layout] = (start, model_to_vector(model), loss, correct, loss_sum)
    (start, plain, loss, correct, loss_sum), (_, fast, fast_loss, fast_correct, fast_sum) = (
        out["contiguous"], out["channels_last"])  # fmt: skip
    step = (plain - start).abs().max().item()
    assert (fast - plain).abs().max().item() <= 1e-2 * step  # of an update of ~1e-2
    assert fast_loss == pytest.approx(loss, rel=1e-5) and fast_sum == pytest.approx(
        loss_sum, rel=1e-5
    )
    assert abs(fast_correct - correct) <= 1
    mlp = build_model("mlp", num_classes=10, in_channels=1, image_size=28)
    assert memory_format_for(mlp, "auto") is None  # no convolution: left as it is


def test_a_model_with_dropout_repeats_its_numbers_with_its_generator_seed():
    """Dropout draws from torch's global generator, which other code advances by varying
    amounts (found by a user: two runs of one command differed); training seeds it from the
    client's generator, and leaves the global generator as it found it."""
    from client_app.training import SGDSettings, train_sgd
    from common.param_vector import model_to_vector

    x, y = torch.randn(64, 20, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 4
    settings = SGDSettings(lr=0.1, epochs=2, batch_size=16)

    def trained(seed: int, global_draws: int) -> torch.Tensor:
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))
        torch.rand(global_draws)  # what other code did before
        before = torch.random.get_rng_state()
        train_sgd(model, x, y, settings, torch.Generator().manual_seed(seed))
        assert torch.equal(torch.random.get_rng_state(), before)
        return model_to_vector(model)

    assert torch.equal(trained(7, 0), trained(7, 5))
    assert not torch.equal(trained(7, 0), trained(8, 0))
