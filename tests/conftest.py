"""Shared test fixtures (where the project's offline datasets live) and the test order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST = SHARED_DATA / "mnist.npz"
CIFAR10 = SHARED_DATA / "cifar10"

# The longest files first (minutes each, mostly waiting on Docker and Flower's polling), so
# that with `-n 2 --dist loadfile` they overlap the rest instead of starting last.
LONGEST_FIRST = ("test_compose.py", "test_tls_netns.py", "test_deployment.py",
                 "test_flower_simulation.py", "test_learning.py")  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file and among the rest stays


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
