"""Split a dataset's labels over federated clients (docs/concepts/data.md).

Everything here is pure numpy and driven by ``np.random.default_rng(seed)``, so every
SuperNode that computes the partition from the same labels and seed gets the same result
without talking to the others. All partitioners return, per client, sorted indices into
``labels``; the order inside a client does not matter because the train/test split
shuffles.
"""

from __future__ import annotations

import math

import numpy as np

PARTITIONERS: tuple[str, ...] = ("iid", "noniid1", "noniid2")

_CLASSES_PER_CLIENT: dict[str, int] = {
    "cifar10": 2,
    "mnist": 2,
    "fashion_mnist": 2,
    "emnist": 6,
    "cifar100": 10,
    "tinyimagenet": 20,
}


def _check_num_clients(num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")


def partition_iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle all indices and cut them into ``num_clients`` parts whose sizes differ by <= 1."""
    _check_num_clients(num_clients)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def partition_noniid1(
    labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int
) -> list[np.ndarray]:
    """Quantity-based label imbalance (non-IID_1), as the authors' ``get_classes``.

    Draw order from one generator (this fixes the result for a seed): (1) each client, in
    index order, draws ``classes_per_client`` distinct classes uniformly without replacement;
    (2) one U(0.4, 0.6) weight per (client, drawn class), clients in index order; (3) per used
    class in ascending label order, a permutation of that class's indices, cut into the
    holders' shares (holders in ascending client index). Holder i of class c gets
    ``floor(alpha_ic / sum_j alpha_jc * n_c)`` samples and the first holder also the
    remainder, so every sample of a used class is assigned exactly once; classes nobody drew
    are dropped.
    """
    labels = np.asarray(labels)
    _check_num_clients(num_clients)
    classes = np.unique(labels)
    if classes_per_client < 1:
        raise ValueError(f"classes_per_client must be at least 1, got {classes_per_client}")
    if classes_per_client > len(classes):
        raise ValueError(
            f"classes_per_client={classes_per_client} exceeds the {len(classes)} classes "
            "in the labels"
        )
    rng = np.random.default_rng(seed)
    drawn = np.stack(
        [
            rng.choice(len(classes), size=classes_per_client, replace=False)
            for _ in range(num_clients)
        ]
    )
    alpha = rng.uniform(0.4, 0.6, size=drawn.shape)

    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for class_pos in np.unique(drawn):
        holders, slots = np.nonzero(drawn == class_pos)  # row-major: holders ascending
        weights = alpha[holders, slots]
        idx = rng.permutation(np.flatnonzero(labels == classes[class_pos]))
        counts = np.floor(weights / weights.sum() * len(idx)).astype(np.int64)
        counts[0] += len(idx) - counts.sum()
        for client, share in zip(holders, np.split(idx, np.cumsum(counts)[:-1]), strict=True):
            parts[client].append(share)
    return [np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts]


def partition_noniid2(
    labels: np.ndarray,
    num_clients: int,
    beta: float,
    min_samples: int,
    seed: int,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """Distribution-based label imbalance (non-IID_2), as the authors' ``dirichlet_distribution``.

    Each attempt draws, per class in ascending label order, client proportions from
    Dirichlet(beta * ones) and cuts the class at ``floor(cumsum(p) * n_c)``. Attempts repeat
    until every client holds more than ``min_samples`` samples (attempts with non-finite
    proportions count as failures). Only the accepted attempt's class indices are shuffled,
    which keeps retries cheap.
    """
    labels = np.asarray(labels)
    _check_num_clients(num_clients)
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    classes, class_sizes = np.unique(labels, return_counts=True)
    n = len(labels)
    advice = "use fewer clients, a larger beta (less skew) or a smaller min_samples"
    if n < num_clients * (min_samples + 1):
        raise ValueError(
            f"non-IID_2 cannot give each of {num_clients} clients more than {min_samples} samples "
            f"from only {n} samples; {advice}"
        )

    rng = np.random.default_rng(seed)
    best_min = -1
    for _ in range(max_attempts):
        proportions = rng.dirichlet(np.full(num_clients, beta), size=len(classes))
        if not np.all(np.isfinite(proportions)):
            continue
        cuts = np.floor(np.cumsum(proportions, axis=1) * class_sizes[:, None]).astype(np.int64)
        cuts = np.minimum(cuts, class_sizes[:, None])
        cuts[:, -1] = class_sizes  # float rounding must not drop the last samples
        counts = np.diff(cuts, axis=1, prepend=0)
        smallest = int(counts.sum(axis=0).min())
        best_min = max(best_min, smallest)
        if smallest > min_samples:
            break
    else:
        raise ValueError(
            f"non-IID_2 partition failed: {max_attempts} Dirichlet(beta={beta}) draws over "
            f"{num_clients} clients and {n} samples ({len(classes)} classes) never gave every "
            f"client more than {min_samples} samples (best smallest client: {best_min}); {advice}"
        )

    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label, row in zip(classes, cuts, strict=True):
        idx = rng.permutation(np.flatnonzero(labels == label))
        for client, share in enumerate(np.split(idx, row[:-1])):
            parts[client].append(share)
    return [np.sort(np.concatenate(p)) for p in parts]


def split_train_test(
    indices: np.ndarray, train_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random per-client split: ``floor(train_fraction * n)`` train, the rest test (both sorted)."""
    if not 0.0 <= train_fraction <= 1.0:
        raise ValueError(f"train_fraction must lie in [0, 1], got {train_fraction}")
    shuffled = np.random.default_rng(seed).permutation(np.asarray(indices))
    n_train = math.floor(train_fraction * len(shuffled))
    return np.sort(shuffled[:n_train]), np.sort(shuffled[n_train:])


def split_validation(
    indices: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``floor(val_fraction * n)`` of a client's training indices for model selection
    (both parts sorted); 0 keeps every index for training, in its order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    indices = np.asarray(indices)
    n_val = math.floor(val_fraction * len(indices))
    if n_val == 0:
        return indices, indices[:0]
    shuffled = np.random.default_rng(seed).permutation(indices)
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])


def client_seed(seed: int, client_id: int) -> int:
    """Seed for one client's own randomness, derived from (seed, client_id) only."""
    return int(np.random.SeedSequence([seed, client_id]).generate_state(1)[0])


def client_split(
    labels: np.ndarray,
    *,
    client_id: int,
    num_clients: int,
    partitioner: str,
    seed: int,
    classes_per_client: int | None = None,
    beta: float | None = None,
    min_samples: int | None = None,
    train_fraction: float = 0.75,
) -> tuple[np.ndarray, np.ndarray]:
    """Partition with ``seed``, then split client ``client_id``'s part with its own derived seed.

    ``classes_per_client`` is needed by "noniid1", ``beta`` and ``min_samples`` by "noniid2".
    """
    _check_num_clients(num_clients)
    if not 0 <= client_id < num_clients:
        raise ValueError(f"client_id must lie in [0, {num_clients}), got {client_id}")
    if partitioner == "iid":
        parts = partition_iid(labels, num_clients, seed)
    elif partitioner == "noniid1":
        if classes_per_client is None:
            raise ValueError("partitioner 'noniid1' needs classes_per_client")
        parts = partition_noniid1(labels, num_clients, classes_per_client, seed)
    elif partitioner == "noniid2":
        if beta is None or min_samples is None:
            raise ValueError("partitioner 'noniid2' needs beta and min_samples")
        parts = partition_noniid2(labels, num_clients, beta, min_samples, seed)
    else:
        raise ValueError(
            f"unknown partitioner {partitioner!r}; valid names: {', '.join(PARTITIONERS)}"
        )
    return split_train_test(parts[client_id], train_fraction, client_seed(seed, client_id))


def default_classes_per_client(dataset_name: str) -> int:
    """Classes each client draws under non-IID_1 (the authors' per-dataset values).

    Dataset names are canonical, as `common.datasets.RawDataset.name` gives them.
    """
    if dataset_name not in _CLASSES_PER_CLIENT:
        raise ValueError(
            f"no default classes_per_client for dataset {dataset_name!r} (known: "
            f"{', '.join(sorted(_CLASSES_PER_CLIENT))}); set data.classes_per_client explicitly"
        )
    return _CLASSES_PER_CLIENT[dataset_name]


def default_dirichlet_beta(dataset_name: str) -> float:
    """Dirichlet concentration for non-IID_2: 0.1 for CIFAR-10 (authors' code), else 0.01."""
    return 0.1 if dataset_name == "cifar10" else 0.01


def default_min_samples(dataset_name: str, num_clients: int) -> int:
    """Each client must hold MORE than this under non-IID_2 (authors' ``least_nums``)."""
    if dataset_name == "emnist":
        return 10
    if dataset_name == "cifar100" and num_clients > 100:
        return 15
    return 30
