"""Who this client is, which model it runs and which data it holds.

A client decides these from its own settings: the SuperNode's node config in deployment
(`client-key`, `model`, `partition-id`, `num-partitions`, `data-source`, `data-root`, `role`,
`local-layers`, `frozen-layers`, `state-dir`), and in simulation the experiment's assignment
rules (client index mod len(clients.models); the last `generalization.novel_clients`
partitions are novel). Nothing here is ever sent to the server except K and the role.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from common.config import DataConfig, ExperimentConfig
from common.datasets import NORMALIZATION, channel_statistics, load_dataset, to_model_tensors
from common.param_vector import parse_layer_patterns
from common.partition import (
    client_split,
    default_classes_per_client,
    default_dirichlet_beta,
    default_min_samples,
)
from common.protocol import ROLES


class NodeConfigError(ValueError):
    """The SuperNode's node config cannot describe a client; says what to set."""


@dataclass(frozen=True)
class ClientSpec:
    key: str
    partition_id: int
    num_partitions: int
    model_name: str
    data: DataConfig
    role: str = "training"  # "novel": joins after the hypernetwork is trained (paper 4.4)
    local_layers: tuple[str, ...] = ()  # patterns of layers that never leave the client
    frozen_layers: tuple[str, ...] = ()  # patterns of layers used but not trained


@dataclass(frozen=True)
class ClientData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    in_channels: int


def _int_setting(node_config: Mapping, key: str) -> int | None:
    value = node_config.get(key)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise NodeConfigError(f"node config {key!r} must be an integer, got {value!r}") from None


def client_spec(node_config: Mapping, cfg: ExperimentConfig) -> ClientSpec:
    """Resolve this node's identity, model and data settings."""
    partition_id = _int_setting(node_config, "partition-id")
    num_partitions = _int_setting(node_config, "num-partitions")
    configured = cfg.data.num_clients
    if num_partitions is None:
        if configured == "auto":
            raise NodeConfigError(
                "the number of clients is unknown: set node config 'num-partitions' "
                "or the experiment's data.num_clients"
            )
        num_partitions = configured
    elif configured != "auto" and configured != num_partitions:
        raise NodeConfigError(
            f"the experiment expects data.num_clients={configured} but this federation has "
            f"num-partitions={num_partitions}: run with --federation-config "
            f"'num-supernodes={configured}' or override data.num_clients={num_partitions}"
        )
    if partition_id is None:
        raise NodeConfigError("node config 'partition-id' is missing (which data partition)")
    if not 0 <= partition_id < num_partitions:
        raise NodeConfigError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    role, model_name = _role_and_model(node_config, cfg, partition_id, num_partitions)
    key = str(node_config.get("client-key") or f"partition-{partition_id}")
    overrides = {}
    if node_config.get("data-source"):
        overrides["source"] = str(node_config["data-source"])
    if node_config.get("data-root"):
        overrides["root"] = str(node_config["data-root"])
    data = cfg.data.model_copy(update=overrides)
    models = cfg.clients.models

    def layers(setting: str, modes: list[str]) -> tuple[str, ...]:
        spec = node_config.get(setting)
        if spec is None:
            spec = modes[(partition_id // len(models)) % len(modes)]
        return tuple(parse_layer_patterns(str(spec)))

    return ClientSpec(
        key,
        partition_id,
        num_partitions,
        model_name,
        data,
        role,
        layers("local-layers", cfg.clients.local_layers),
        layers("frozen-layers", cfg.clients.frozen_layers),
    )


def _role_and_model(
    node_config: Mapping, cfg: ExperimentConfig, partition_id: int, num_partitions: int
) -> tuple[str, str]:
    """Node config `role` and `model` win; else the experiment's rules decide."""
    novel_count = cfg.generalization.novel_clients
    first_novel = num_partitions - novel_count
    role = str(node_config.get("role") or ("novel" if partition_id >= first_novel else "training"))
    if role not in ROLES:
        raise NodeConfigError(f"node config 'role' must be one of {ROLES}, got {role!r}")
    if node_config.get("model"):
        return role, str(node_config["model"])
    novel_models = cfg.generalization.novel_models
    if role == "novel" and novel_models and partition_id >= first_novel:
        return role, novel_models[(partition_id - first_novel) % len(novel_models)]
    models = cfg.clients.models
    return role, models[partition_id % len(models)]


def load_client_data(spec: ClientSpec, seed: int, device: str = "cpu") -> ClientData:
    """This client's train/test tensors, on `device` (memoised per process: decoded,
    normalised and moved once, then used by every round without a DataLoader)."""
    data = _client_data(spec.data.model_dump_json(), spec.partition_id, spec.num_partitions, seed)
    return data if torch.device(device).type == "cpu" else _on_device(data, device)


@functools.lru_cache(maxsize=128)
def _on_device(data: ClientData, device: str) -> ClientData:
    return dataclasses.replace(
        data,
        x_train=data.x_train.to(device),
        y_train=data.y_train.to(device),
        x_test=data.x_test.to(device),
        y_test=data.y_test.to(device),
    )


@functools.lru_cache(maxsize=128)
def _client_data(data_json: str, partition_id: int, num_partitions: int, seed: int) -> ClientData:
    data = DataConfig.model_validate_json(data_json)
    raw = load_dataset(
        data.source, root=data.root, download=data.download, cache_dir=data.cache_dir
    )
    labels = raw.labels
    pool = np.arange(len(labels))
    if data.fraction < 1.0:
        rng = np.random.default_rng(seed)
        pool = np.sort(rng.choice(len(labels), int(data.fraction * len(labels)), replace=False))

    def auto(value, default):
        return default() if value == "auto" else value

    train_idx, test_idx = client_split(
        labels[pool],
        client_id=partition_id,
        num_clients=num_partitions,
        partitioner=data.partitioner,
        seed=seed,
        classes_per_client=auto(
            data.classes_per_client, lambda: default_classes_per_client(raw.name)
        ),
        beta=auto(data.dirichlet_beta, lambda: default_dirichlet_beta(raw.name)),
        min_samples=auto(data.min_samples, lambda: default_min_samples(raw.name, num_partitions)),
        train_fraction=data.train_fraction,
    )

    normalize = data.normalize
    if normalize == "auto" and raw.name not in NORMALIZATION:
        normalize = channel_statistics(raw.images[pool])

    def tensors(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_model_tensors(
            raw.images[pool[idx]],
            normalize=normalize,
            dataset_name=raw.name,
            image_size=data.image_size,
        )
        return x, torch.as_tensor(labels[pool[idx]], dtype=torch.long)

    x_train, y_train = tensors(train_idx)
    x_test, y_test = tensors(test_idx)
    return ClientData(x_train, y_train, x_test, y_test, raw.num_classes, raw.images.shape[-1])
