"""Shared test fixtures: where the project's offline datasets live."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST = SHARED_DATA / "mnist.npz"
CIFAR10 = SHARED_DATA / "cifar10"


@pytest.fixture
def mnist_npz() -> Path:
    if not MNIST.is_file():
        pytest.skip(f"offline MNIST copy not found at {MNIST}")
    return MNIST
