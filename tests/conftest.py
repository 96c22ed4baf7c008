"""Shared test fixtures: where the project's offline datasets live."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST = SHARED_DATA / "mnist.npz"
CIFAR10 = SHARED_DATA / "cifar10"


@pytest.fixture
def mnist_npz() -> Path:
    if not MNIST.is_file():
        pytest.skip(f"offline MNIST copy not found at {MNIST}")
    return MNIST


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    """240 28x28 grayscale images of 4 classes, each class marked in one corner."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 60)
    images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    images[:, :4, :4] = (labels * 60)[:, None, None]  # a learnable corner
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=images, y_train=labels, x_test=images[:1], y_test=labels[:1])
    return path
