"""Partitioners (docs/concepts/data.md): the properties the experiments rely on."""

from __future__ import annotations

import time

import numpy as np
import pytest

from common import partition as P


def _labels(num_classes: int, per_class: int) -> np.ndarray:
    """Class-balanced labels in shuffled order, like a real training split."""
    return np.random.default_rng(123).permutation(np.repeat(np.arange(num_classes), per_class))


def _assert_disjoint(parts: list[np.ndarray]) -> np.ndarray:
    union = np.concatenate(parts)
    assert len(np.unique(union)) == len(union), "a sample was given to two clients"
    return union


# ----------------------------------------------------------------------------- non-IID_1
def test_noniid1_each_client_has_s_distinct_classes() -> None:
    labels = _labels(10, 1000)
    parts = P.partition_noniid1(labels, num_clients=20, classes_per_client=2, seed=0)
    assert len(parts) == 20
    for part in parts:
        assert len(np.unique(labels[part])) == 2


def test_noniid1_used_classes_fully_assigned_once_unused_dropped() -> None:
    labels = _labels(10, 300)
    parts = P.partition_noniid1(labels, num_clients=3, classes_per_client=2, seed=4)
    union = _assert_disjoint(parts)
    used = np.unique(labels[union])
    assert len(used) < 10  # 3 clients x 2 classes cannot cover 10 classes
    assert np.array_equal(np.sort(union), np.flatnonzero(np.isin(labels, used)))
    for part in parts:
        assert np.array_equal(part, np.sort(part))  # documented: sorted indices


def test_noniid1_shares_follow_uniform_weights() -> None:
    labels = _labels(10, 5000)
    num_clients = 30
    parts = P.partition_noniid1(labels, num_clients, classes_per_client=2, seed=7)
    for c in range(10):
        n_c = int((labels == c).sum())
        holders = [i for i in range(num_clients) if (labels[parts[i]] == c).any()]
        k = len(holders)
        lo = 0.4 / (0.4 + 0.6 * (k - 1))
        hi = 0.6 / (0.6 + 0.4 * (k - 1))
        for rank, i in enumerate(holders):
            share = int((labels[parts[i]] == c).sum())
            extra = k - 1 if rank == 0 else 0
            assert lo * n_c - 1 <= share <= hi * n_c + extra, (c, i, share, k)


def test_noniid1_handles_arbitrary_label_values() -> None:
    labels = np.repeat(np.array([3, 7, 42]), 50)
    parts = P.partition_noniid1(labels, num_clients=4, classes_per_client=2, seed=1)
    assert all(set(labels[p]) <= {3, 7, 42} and len(set(labels[p])) == 2 for p in parts)


def test_noniid1_deterministic_by_seed() -> None:
    labels = _labels(10, 200)
    a = P.partition_noniid1(labels, 10, 2, seed=5)
    b = P.partition_noniid1(labels, 10, 2, seed=5)
    c = P.partition_noniid1(labels, 10, 2, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_noniid1_rejects_bad_arguments() -> None:
    labels = _labels(5, 10)
    with pytest.raises(ValueError, match="classes_per_client"):
        P.partition_noniid1(labels, 3, classes_per_client=6, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        P.partition_noniid1(labels, 0, classes_per_client=2, seed=0)


# ----------------------------------------------------------------------------- non-IID_2
def test_noniid2_cifar10_like_respects_minimum_and_covers_everything() -> None:
    labels = _labels(10, 5000)
    parts = P.partition_noniid2(labels, num_clients=10, beta=0.1, min_samples=30, seed=0)
    assert min(len(p) for p in parts) > 30
    union = _assert_disjoint(parts)
    assert np.array_equal(np.sort(union), np.arange(len(labels)))


def test_noniid2_is_skewed_at_small_beta() -> None:
    labels = _labels(10, 1000)
    parts = P.partition_noniid2(labels, num_clients=5, beta=0.01, min_samples=30, seed=3)
    # With Dir(0.01) each class is held almost entirely by one client.
    for c in range(10):
        top = max(int((labels[p] == c).sum()) for p in parts)
        assert top > 0.9 * 1000


def test_noniid2_deterministic_by_seed() -> None:
    labels = _labels(10, 500)
    a = P.partition_noniid2(labels, 8, 0.1, 10, seed=11)
    b = P.partition_noniid2(labels, 8, 0.1, 10, seed=11)
    c = P.partition_noniid2(labels, 8, 0.1, 10, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_noniid2_impossible_request_fails_fast_with_advice() -> None:
    labels = _labels(10, 20)  # 200 samples
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        P.partition_noniid2(labels, num_clients=100, beta=0.01, min_samples=30, seed=0)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    for advice in ("fewer clients", "larger beta", "smaller min_samples"):
        assert advice in message


def test_noniid2_gives_up_after_max_attempts() -> None:
    labels = _labels(10, 50)  # feasible in principle, hopeless with Dir(0.01)
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        P.partition_noniid2(labels, 20, beta=0.01, min_samples=20, seed=0, max_attempts=200)
    assert time.perf_counter() - start < 5
    assert "200" in str(info.value) and "fewer clients" in str(info.value)


def test_noniid2_redraws_non_finite_proportions(monkeypatch: pytest.MonkeyPatch) -> None:
    real_default_rng = np.random.default_rng

    class FirstDrawNaN:
        def __init__(self, seed: int) -> None:
            self._rng = real_default_rng(seed)
            self.draws = 0

        def dirichlet(self, alpha, size=None):
            self.draws += 1
            out = self._rng.dirichlet(alpha, size)
            return np.full_like(out, np.nan) if self.draws == 1 else out

        def __getattr__(self, name):
            return getattr(self._rng, name)

    monkeypatch.setattr(P.np.random, "default_rng", FirstDrawNaN)
    labels = _labels(4, 100)
    parts = P.partition_noniid2(labels, 3, beta=1.0, min_samples=5, seed=0)
    assert min(len(p) for p in parts) > 5
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    with pytest.raises(ValueError, match="1 Dirichlet"):
        P.partition_noniid2(labels, 3, beta=1.0, min_samples=5, seed=0, max_attempts=1)


# ----------------------------------------------------------------------------- train/test
@pytest.mark.parametrize("n", [0, 1, 3, 4, 101, 1000])
def test_split_sizes_are_floor_and_disjoint(n: int) -> None:
    indices = np.arange(1000, 1000 + n)
    train, test = P.split_train_test(indices, 0.75, seed=3)
    assert len(train) == int(np.floor(0.75 * n)) and len(test) == n - len(train)
    assert np.array_equal(np.sort(np.concatenate([train, test])), indices)


def test_split_is_deterministic_and_seed_dependent() -> None:
    indices = np.arange(400)
    a = P.split_train_test(indices, 0.75, seed=1)
    b = P.split_train_test(indices, 0.75, seed=1)
    c = P.split_train_test(indices, 0.75, seed=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("partitioner", ["iid", "noniid1", "noniid2"])
def test_client_split_is_independent_of_other_queries(partitioner: str) -> None:
    labels = _labels(10, 300)
    kwargs = dict(
        num_clients=6,
        partitioner=partitioner,
        seed=9,
        classes_per_client=2,
        beta=0.1,
        min_samples=10,
    )
    first = P.client_split(labels, client_id=2, **kwargs)
    others = [P.client_split(labels, client_id=i, **kwargs) for i in (5, 0, 1)]
    again = P.client_split(labels, client_id=2, **kwargs)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    all_parts = [*others, first]
    _assert_disjoint([idx for pair in all_parts for idx in pair])
    # The split seed depends on (seed, client_id) only, not on the other clients.
    partitions = {
        "iid": lambda: P.partition_iid(labels, 6, 9),
        "noniid1": lambda: P.partition_noniid1(labels, 6, 2, 9),
        "noniid2": lambda: P.partition_noniid2(labels, 6, 0.1, 10, 9),
    }
    parts = partitions[partitioner]()
    expected = P.split_train_test(parts[2], 0.75, P.client_seed(9, 2))
    assert np.array_equal(first[0], expected[0]) and np.array_equal(first[1], expected[1])


def test_client_seed_is_stable_and_distinct() -> None:
    assert P.client_seed(0, 1) == P.client_seed(0, 1)
    assert len({P.client_seed(s, c) for s in range(3) for c in range(50)}) == 150


def test_client_split_rejects_bad_arguments() -> None:
    labels = _labels(4, 10)
    with pytest.raises(ValueError, match="iid, noniid1, noniid2"):
        P.client_split(labels, client_id=0, num_clients=2, partitioner="dirichlet", seed=0)
    with pytest.raises(ValueError, match="client_id"):
        P.client_split(labels, client_id=2, num_clients=2, partitioner="iid", seed=0)
    with pytest.raises(ValueError, match="classes_per_client"):
        P.client_split(labels, client_id=0, num_clients=2, partitioner="noniid1", seed=0)
    with pytest.raises(ValueError, match="beta"):
        P.client_split(labels, client_id=0, num_clients=2, partitioner="noniid2", seed=0)


def test_iid_sizes_differ_by_at_most_one() -> None:
    parts = P.partition_iid(np.zeros(103), 10, seed=0)
    assert {len(p) for p in parts} == {10, 11}
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(103))


# ----------------------------------------------------------------------------- defaults
def test_defaults_follow_spec() -> None:
    expected = {
        "cifar10": 2,
        "mnist": 2,
        "fashion_mnist": 2,
        "emnist": 6,
        "cifar100": 10,
        "tinyimagenet": 20,
    }
    for name, s in expected.items():
        assert P.default_classes_per_client(name) == s
    with pytest.raises(ValueError, match="explicitly"):
        P.default_classes_per_client("svhn")
    assert P.default_dirichlet_beta("cifar10") == 0.1
    assert P.default_dirichlet_beta("cifar100") == 0.01
    assert P.default_dirichlet_beta("mnist") == 0.01
    assert P.default_min_samples("cifar100", 100) == 30
    assert P.default_min_samples("cifar100", 101) == 15
    assert P.default_min_samples("emnist", 200) == 10
    assert P.default_min_samples("cifar10", 500) == 30
