"""A site's own model, plugged into MH-pFedHN without any change to the server.

The SuperNode names it in its node config by import path:

    flower-supernode ... --node-config 'model="site_models:small_cnn" client-key="site-a" ...'

and the ClientApp process must be able to import `site_models` (here: PYTHONPATH set to
this folder for the SuperExec that runs the ClientApp). The server only ever learns K.
"""

from __future__ import annotations

from torch import nn


def small_cnn(num_classes: int, in_channels: int) -> nn.Module:
    """Any factory works: it is called with those of num_classes, in_channels and image_size
    that it accepts, and must return an nn.Module taking (batch, in_channels, 32, 32)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 5, padding=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, num_classes),
    )
