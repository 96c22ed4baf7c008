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
