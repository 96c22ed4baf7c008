"""Who this client is: its key, role, model, data partition and layer selections.

A client decides these from its own settings: the SuperNode's node config in deployment
(`client-key`, `model`, `partition-id`, `num-partitions`, `data-source`, `data-root`, `role`,
`local-layers`, `frozen-layers`, `state-dir`), and in simulation the experiment's assignment
rules (client index mod len(clients.models); the last `generalization.novel_clients`
partitions are novel). Of these, only the key (with the proof of the client's secret) and the
role reach the server, beside K; the model, data and layer selections never do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from common.config import DataConfig, ExperimentConfig
from common.param_vector import parse_layer_patterns
from common.protocol import ROLES, check_client_key


class NodeConfigError(ValueError):
    """The SuperNode's node config cannot describe a client; says what to set."""


NODE_CONFIG_KEYS = (
    "partition-id",
    "num-partitions",
    "client-key",
    "client-secret",
    "model",
    "data-source",
    "data-root",
    "role",
    "local-layers",
    "frozen-layers",
    "state-dir",
    "message-log",
)


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
    unknown = sorted(set(node_config) - set(NODE_CONFIG_KEYS))
    if unknown:
        raise NodeConfigError(
            f"unknown node config key(s) {unknown}; valid: {list(NODE_CONFIG_KEYS)}"
        )
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
    try:
        check_client_key(key)
    except ValueError as err:
        raise NodeConfigError(f"node config 'client-key': {err}") from None
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
