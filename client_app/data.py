"""This client's data: its partition of the source's training split, as tensors in memory.

Decoded, partitioned, normalised and moved to the device once per process and then used by
every round without a DataLoader (docs/concepts/data.md).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client_app.spec import ClientSpec
from common.config import DataConfig
from common.datasets import (
    NORMALIZATION,
    channel_statistics,
    clear_memo,
    load_dataset,
    source_fingerprint,
    to_model_tensors,
)
from common.files import atomic_file
from common.partition import (
    client_split,
    default_classes_per_client,
    default_dirichlet_beta,
    default_min_samples,
    split_validation,
)
from common.seeding import stable_seed


@dataclass(frozen=True)
class ClientData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    in_channels: int
    x_val: torch.Tensor  # held out of the training data for model selection (may be empty)
    y_val: torch.Tensor


def load_client_data(spec: ClientSpec, seed: int, device: str = "cpu") -> ClientData:
    """This client's train/test tensors, on `device` (memoised per process: decoded,
    normalised and moved once, then used by every round without a DataLoader; with
    data.cache_partitions also kept on disk, so that a deployed ClientApp, a fresh process
    per message, reads its tensors instead of decoding and partitioning the source again)."""
    args = (spec.data.model_dump_json(), spec.partition_id, spec.num_partitions, seed)
    data = _cached_on_disk(*args) if spec.data.cache_partitions else _client_data(*args)
    return data if torch.device(device).type == "cpu" else _on_device(data, device)


PARTITION_CACHE_FORMAT = 2
logger = logging.getLogger("flwr.mh_pfedhn")


@functools.lru_cache(maxsize=128)
def _cached_on_disk(
    data_json: str, partition_id: int, num_partitions: int, seed: int
) -> ClientData:
    data = DataConfig.model_validate_json(data_json)
    what = data.model_dump_json(exclude={"cache_max_gb"})  # the cache's size keys nothing
    key = json.dumps([PARTITION_CACHE_FORMAT, what, partition_id, num_partitions, seed,
                      source_fingerprint(data.source, data.root)])  # fmt: skip
    path = (
        Path(data.cache_dir).expanduser()
        / "partitions"
        / f"{hashlib.sha256(key.encode()).hexdigest()}.pt"
    )
    if path.is_file():
        try:
            cached = ClientData(**torch.load(path, weights_only=True))
            os.utime(path)  # recently used: the last to be evicted
            return cached
        except Exception:  # noqa: BLE001 - a damaged (or just evicted) entry is rebuilt
            path.unlink(missing_ok=True)
    loaded = _client_data(data_json, partition_id, num_partitions, seed)
    if _saved(loaded, path):
        evict_least_recent(path.parent, int(data.cache_max_gb * 1e9), keep=path)
    return loaded


def _saved(data: ClientData, path: Path) -> bool:
    """Write a cache entry atomically; a failure (a full disk) costs the cache, not the run."""
    try:
        with atomic_file(path) as f:
            torch.save(dataclasses.asdict(data), f)
        return True
    except OSError as err:
        logger.warning("the partition cache %s was not written (%s); the client trains on",
                       path.parent, err)  # fmt: skip
        return False


def evict_least_recent(folder: Path, limit_bytes: int, keep: Path) -> list[Path]:
    """Delete the least recently used cache entries (by modification time, which a hit
    renews) until the folder holds at most `limit_bytes`; never `keep`. 0: no limit. Entries
    another process deletes meanwhile are skipped. Returns what was deleted."""
    if limit_bytes <= 0:
        return []
    entries = []
    for entry in folder.glob("*.pt"):
        try:
            stat = entry.stat()
        except FileNotFoundError:
            continue
        entries.append((stat.st_mtime, stat.st_size, entry))
    total = sum(size for _, size, _ in entries)
    deleted = []
    for _, size, entry in sorted(entries, key=lambda e: e[0]):
        if total <= limit_bytes:
            break
        if entry == keep:
            continue
        entry.unlink(missing_ok=True)
        total -= size
        deleted.append(entry)
    return deleted


@functools.lru_cache(maxsize=128)
def _on_device(data: ClientData, device: str) -> ClientData:
    return dataclasses.replace(
        data,
        x_train=data.x_train.to(device),
        y_train=data.y_train.to(device),
        x_test=data.x_test.to(device),
        y_test=data.y_test.to(device),
        x_val=data.x_val.to(device),
        y_val=data.y_val.to(device),
    )


def sample_pool(fraction: float, size: int, seed: int) -> np.ndarray:
    """The sorted indices of the source examples in use (data.fraction of them, seeded)."""
    if fraction >= 1.0:
        return np.arange(size)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(size, int(fraction * size), replace=False))


def client_indices(
    data: DataConfig,
    labels: np.ndarray,
    dataset_name: str,
    partition_id: int,
    num_partitions: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, test) indices into `labels` of this client's data: its partition,
    split into train and test, then the validation share held out of train (seeded per
    client; empty with val_fraction 0). The three are disjoint."""  # fmt: skip
    pool = sample_pool(data.fraction, len(labels), seed)

    def auto(value, default, partitioner):
        """The dataset's default, looked up only where the partitioner uses the setting (a
        dataset without defaults still partitions IID)."""
        if value != "auto":
            return value
        return default() if data.partitioner == partitioner else None

    train_idx, test_idx = client_split(
        labels[pool],
        client_id=partition_id,
        num_clients=num_partitions,
        partitioner=data.partitioner,
        seed=seed,
        classes_per_client=auto(
            data.classes_per_client, lambda: default_classes_per_client(dataset_name), "noniid1"
        ),
        beta=auto(data.dirichlet_beta, lambda: default_dirichlet_beta(dataset_name), "noniid2"),
        min_samples=auto(
            data.min_samples, lambda: default_min_samples(dataset_name, num_partitions), "noniid2"
        ),
        train_fraction=data.train_fraction,
    )
    train_idx, val_idx = split_validation(
        train_idx, data.val_fraction, stable_seed(seed, "validation", partition_id)
    )
    return pool[train_idx], pool[val_idx], pool[test_idx]


@functools.lru_cache(maxsize=128)
def _client_data(data_json: str, partition_id: int, num_partitions: int, seed: int) -> ClientData:
    data = DataConfig.model_validate_json(data_json)
    raw = load_dataset(
        data.source, root=data.root, download=data.download, cache_dir=data.cache_dir
    )
    train_idx, val_idx, test_idx = client_indices(
        data, raw.labels, raw.name, partition_id, num_partitions, seed
    )
    normalize = data.normalize
    if normalize == "auto" and raw.name not in NORMALIZATION:
        normalize = channel_statistics(
            raw.images[sample_pool(data.fraction, len(raw.labels), seed)]
        )

    def tensors(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_model_tensors(
            raw.images[idx],
            normalize=normalize,
            dataset_name=raw.name,
            image_size=data.image_size,
        )
        return x, torch.as_tensor(raw.labels[idx], dtype=torch.long)

    x_train, y_train = tensors(train_idx)
    x_test, y_test = tensors(test_idx)
    x_val, y_val = tensors(val_idx)
    return ClientData(x_train, y_train, x_test, y_test, raw.num_classes, raw.images.shape[-1],
                      x_val, y_val)  # fmt: skip


def forget_loaded_data() -> None:
    """Drop the per-process memos of loaded datasets and client data (a sweep moving on to
    other data: the on-disk caches stay)."""
    clear_memo()
    _client_data.cache_clear()
    _cached_on_disk.cache_clear()
    _on_device.cache_clear()
