"""Experiment configuration: YAML files in configs/, a preset, then Flower run-config overrides
(docs/configuration.md, generated from this schema).

Resolution order (later wins): schema defaults < experiment YAML < preset < run config.
A method may declare its own settings (a pydantic model named in its registry entry,
common/methods.py); they live in a section named after the method (or the model's `section`),
e.g. `fedavgm.momentum`, and are validated with the rest.
Every leaf setting is also a key of `[tool.flwr.app.config]` in pyproject.toml with the value
"" (meaning "keep the YAML's value"), because Flower only accepts overrides for keys the app
declares; `python -m common.generated --write` writes that list from the schema, and a
test fails when it is stale. `flwr run . -c 'client.lr=0.005 fedavgm.momentum=0.5'` then works.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from common.methods import METHODS, Method, get_method

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"
UNSET = ""  # run-config value meaning "not overridden"
DEFAULT_MAX_PARAMS = 50_000_000  # the largest K a server accepts unless configured
EXPERIMENT_KEY = "experiment"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    source: str = Field(
        "mnist",
        description="cifar10|cifar100|mnist|fashion_mnist|emnist, "
        "imagefolder:<dir>, tinyimagenet:<dir> or npz:<file>",
    )
    root: str = Field(
        "data", description="folder of torchvision's dataset files (data.download puts them there)"
    )
    download: bool = Field(
        True, description="let torchvision download a named dataset into data.root when missing"
    )
    cache_dir: str = Field(
        "~/.cache/mh-pfedhn",
        description="where decoded image folders (and, with cache_partitions, the clients' "
        "partitions) are cached",
    )
    cache_partitions: bool = Field(
        True, description="keep each client's partition, as tensors, under cache_dir"
    )
    cache_max_gb: float = Field(
        10.0,
        ge=0.0,
        description="the most the partition cache may hold; the least recently used "
        "partitions are deleted beyond it (0: no limit)",
    )
    fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="seeded share of the training split kept as the pool that is partitioned "
        "(e.g. 0.1 for a quick run)",
    )
    partitioner: Literal["noniid1", "noniid2", "iid"] = Field(
        "noniid1",
        description="how the pool is cut into clients: noniid1 (a few classes per client, "
        "U(0.4, 0.6) shares), noniid2 (Dirichlet proportions per class) or iid "
        "(docs/concepts/data.md)",
    )
    num_clients: int | Literal["auto"] = Field(
        "auto",
        description="number of clients (partitions); must equal the number of SuperNodes; "
        "auto: the SuperNodes' num-partitions (sweeps need a number)",
    )
    classes_per_client: int | Literal["auto"] = Field(
        "auto", description="noniid1: classes each client draws; auto: the dataset's default"
    )
    dirichlet_beta: float | Literal["auto"] = Field(
        "auto", description="noniid2: the Dirichlet concentration; auto: the dataset's default"
    )
    min_samples: int | Literal["auto"] = Field(
        "auto",
        description="noniid2: every client must hold more than this many samples (the draw "
        "is repeated until it does); auto: the dataset's default",
    )
    train_fraction: float = Field(
        0.75,
        gt=0.0,
        lt=1.0,
        description="share of each client's part it trains on; the rest is its test split "
        "(paper: 75% / 25%)",
    )
    val_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of each client's training data held out as a validation split "
        "(seeded per client), evaluated beside the test split so that a round can be "
        "selected without looking at test data; 0: no validation split",
    )
    normalize: Literal["auto", "none"] = Field(
        "auto",
        description="auto: per-channel statistics chosen by the dataset's name (for other "
        "datasets, the pool's own); none: only scale to [0, 1]",
    )
    image_size: int = Field(32, gt=0, description="images are resized to this side length")


def _comma_list(value: Any) -> Any:
    """Run-config lists arrive as one comma-separated string."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class ClientsConfig(_Section):
    """How simulated clients pick a model: client index mod len(models) (docs/concepts/models.md).

    `local_layers` and `frozen_layers` are lists of modes; a mode is "none" or parameter-name
    patterns joined by "|" (fnmatch, e.g. "classifier.5.*|features.0.*"). Client i takes mode
    (i // len(models)) mod len(modes), so every architecture gets every mode in turn.
    A SuperNode's node config (`local-layers`, `frozen-layers`) overrides this for its client.
    """

    models: list[str] = Field(
        default_factory=lambda: ["lenet"],
        description="simulated client i runs models[i mod len(models)]: zoo names "
        "(docs/concepts/models.md) or import paths module:factory; a method that trains one "
        "architecture (FedAvg, pFedLA, PeFLL, ...) takes one",
    )
    local_layers: list[str] = Field(
        default_factory=lambda: ["none"],
        description="layers kept on the client, never sent (paper C.9)",
    )
    frozen_layers: list[str] = Field(
        default_factory=lambda: ["none"],
        description="layers generated and used but not trained: zero delta (paper C.10)",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        value = _comma_list(value)
        if not value:
            raise ValueError("at least one model name is needed")
        return value

    @field_validator("local_layers", "frozen_layers", mode="before")
    @classmethod
    def _modes(cls, value: Any) -> Any:
        value = _comma_list(value)
        return value or ["none"]


class ClientTrainConfig(_Section):
    lr: float = Field(
        5e-3,
        gt=0,
        description="local SGD learning rate (the authors' code; the paper's text: 1e-3, "
        "preset paper_text; chosen by measurement, docs/concepts/algorithm.md)",
    )
    momentum: float = Field(0.9, ge=0, description="local SGD momentum")
    weight_decay: float = Field(
        5e-4, ge=0, description="local SGD weight decay (the paper's text: 1e-4)"
    )
    batch_size: int = Field(64, gt=0, description="local batch size")
    epochs: int = Field(1, gt=0, description="local epochs per round (the paper's text: 2)")
    grad_clip: float = Field(
        50.0, gt=0, description="local gradients are clipped to this norm before each step"
    )
    device: str = Field("cpu", description="where clients train: cpu, cuda or cuda:N")
    memory_format: Literal["auto", "contiguous", "channels_last"] = Field(
        "auto",
        description="memory layout of convolutional models while they train and evaluate: "
        "auto = channels_last on the CPU (1.4-2.4x faster per step measured here), contiguous "
        "on GPUs; results agree up to float rounding",
    )
    upload: Literal["dense", "top_p"] = Field(
        "dense", description="top_p: send only the largest |delta| entries (paper C.7)"
    )
    upload_top_p: float = Field(0.3, gt=0.0, le=1.0, description="share of entries sent")
    state_dir: str = Field(
        "",
        description="where clients keep their state on disk (BatchNorm statistics, local "
        "layers, the Local baseline's model), one folder per client key; a SuperNode's node "
        "config `state-dir` wins; '' = in memory only (Flower's context.state)",
    )


#: `hypernetwork.in_flight: auto` on Flower's deployment runtime (measured: docs/results.md,
#: "Clients in flight": 2 learn as one at a time does with 10 and with 50 clients; 5 of 10 and
#: 10 of 50 do not).
DEPLOYED_IN_FLIGHT = 2


class HypernetworkConfig(_Section):
    chunk_size: int = Field(
        3072,
        gt=0,
        description="parameters a head emits per embedding; a client of K parameters gets "
        "ceil(K / chunk_size) embeddings",
    )
    embedding_dim: int = Field(64, gt=0, description="length of each embedding vector")
    hidden_dim: int = Field(128, gt=0, description="width of the shared feature extractor")
    hidden_layers: int = Field(3, gt=0, description="linear layers of the shared feature extractor")
    embedding_std: float = Field(
        1.0,
        gt=0,
        description="standard deviation of the embeddings' normal initialisation (the "
        "authors' code: 0.002, the paper preset)",
    )
    lr: float = Field(2e-4, gt=0, description="Adam learning rate of the hypernetwork")
    grad_clip: float = Field(
        50.0, gt=0, description="each update's gradient is clipped to this norm"
    )
    schedule: Literal["one_by_one", "cohorts", "parallel_sequential", "parallel_mean"] = Field(
        "one_by_one",
        description="how a round's client updates reach the hypernetwork "
        "(docs/concepts/schedules.md): one_by_one (generate, train, step, client after "
        "client: the authors' code, with hypernetwork.in_flight clients training at once); "
        "cohorts (in_flight clients at a time train vectors of one state, then step one by "
        "one); parallel_sequential (all train the round-start theta, then one Adam step per "
        "delta in a seeded order); parallel_mean (one step on the mean VJP)",
    )
    in_flight: int | Literal["auto"] = Field(
        "auto",
        description="one_by_one: clients training at once; each delta is applied in the "
        "seeded order at most in_flight - 1 steps after its vector was generated (1: the "
        "authors' round, exactly). cohorts: the size of a cohort. auto: 1 in simulation (the "
        f"authors' round), {DEPLOYED_IN_FLIGHT} when deployed (sites train at once; "
        "docs/concepts/schedules.md)",
    )

    @field_validator("in_flight")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if value != "auto" and value < 1:
            raise ValueError("must be at least 1, or auto")
        return value

    vjp_at: Literal["generated", "current"] = Field(
        "current",
        description="with clients in flight, where a delta's VJP is taken: at the state "
        "its vector was generated from, or at the state when it is applied",
    )
    device: str = Field(
        "auto",
        description="where the hypernetwork lives: auto (cuda when present, else cpu), cpu, "
        "cuda or cuda:N",
    )


class ServerConfig(_Section):
    max_params: int = Field(DEFAULT_MAX_PARAMS, gt=0, description="largest K the server accepts")
    memory_budget_gb: float | Literal["auto"] = Field(
        "auto",
        description="memory the server's learned state may take (parameters, gradients, "
        "Adam moments); a registration that would exceed it is refused before anything is "
        "allocated. auto: half the machine's memory, or 90% of the GPU's",
    )
    client_memory_gb: float | Literal["auto"] = Field(
        "auto",
        description="the most memory one client's registration may add to the server's "
        "learned state (its embeddings and a new head), so that no client takes the whole "
        "budget; auto: a quarter of server.memory_budget_gb",
    )
    max_delta_abs: float = Field(
        1e4,
        gt=0,
        description="a delta with an entry larger than this in absolute value is "
        "refused (parameter changes of that size are never honest)",
    )
    max_example_weight: float = Field(
        4.0,
        ge=0,
        description="a client's example count weighs at most this many times the "
        "round's lower median, in aggregation (FedAvg, MH-pFedHNGD phase 1) and in pooled "
        "accuracy and loss; 0: unbounded",
    )
    delta_norm_bound: float = Field(
        0.0,
        ge=0,
        description="defence against hostile directions: a delta whose per-coordinate size "
        "(L2 norm / sqrt(K)) is above this many times the median of the recently accepted "
        "ones (of every K, and of its own K once that has history: the tighter) is scaled "
        "down to that; 0: off",
    )
    require_client_proof: bool = Field(
        True,
        description="refuse clients that send no client-proof (their key could be "
        "taken over by anyone)",
    )
    bind_node_ids: bool = Field(
        False,
        description="with Flower's SuperNode authentication on (stable node ids): a "
        "key also stays bound to the node id it first registered from",
    )
    requery_rounds: int = Field(
        1,
        ge=0,
        description="a refused node is asked again after this many rounds, then "
        "after twice as many each time (at most 64); 0: never",
    )
    fraction_train: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="seeded share of the clients trained per round (paper C.3); the "
        "others' state does not change",
    )
    min_nodes: int = Field(
        2, gt=0, description="nodes to wait for (wait_for_nodes_s) before round 0"
    )
    max_clients: int = Field(
        0,
        ge=0,
        description="the most clients the federation admits (first come, refused after: a "
        "flood of fake nodes cannot crowd it); 0: no limit (with SuperNode authentication "
        "on, only registered nodes can join at all)",
    )
    min_clients: int = Field(
        1,
        ge=0,
        description="admitted clients needed to start; fewer stop the run with every "
        "node's refusal reason",
    )
    stop_on_client_error: bool = Field(
        False,
        description="a client whose ClientApp raises stops the run, naming it and what it "
        "raised (the sweep runner sets it: a simulated client is the experiment's own); "
        "false: its reply is rejected and the round goes on, as a deployment must",
    )
    wait_for_nodes_s: float = Field(
        300.0, ge=0, description="seconds to wait for min_nodes nodes before round 0"
    )
    timeout_s: float = Field(3600.0, gt=0, description="seconds an exchange waits for its replies")
    evaluate_every: int = Field(
        1,
        ge=0,
        description="evaluate every k rounds (round 0, the last round and the join round "
        "always); 0: never",
    )
    output_root: str = Field("outputs", description="folder that holds the run directories")
    run_name: str = Field(
        "auto",
        description="the run directory's name; auto: <name>-<date>-<time>-run<id>; a folder "
        "that holds a run already is refused (server.resume continues it)",
    )
    fuse_evaluation: bool = Field(
        True,
        description="a round's evaluation travels with the next round's train messages "
        "(one exchange per round) where the method allows it; false: its own exchange",
    )
    pull_interval_s: float = Field(
        0.05,
        gt=0,
        description="seconds before the first pull for replies, and after each "
        "reply (Flower's own loop waits a fixed 3 s)",
    )
    max_pull_interval_s: float = Field(
        0.5,
        gt=0,
        description="while no reply arrives the wait grows 1.5x per pull up to this "
        "(fewer idle calls to the SuperLink); = pull_interval_s: a fixed wait",
    )
    checkpoint_every: int = Field(1, ge=0, description="rounds between checkpoints; 0 = never")
    checkpoint_key_file: str = Field(
        "",
        description="the server's secret key that authenticates its checkpoints (made on "
        "first use, mode 0600); a checkpoint altered, or made under another key, is refused; "
        "'' = ~/.config/mh-pfedhn/checkpoint.key",
    )
    resume: str = Field("", description="a run directory to continue from its checkpoint")

    @model_validator(mode="after")
    def _pull_waits_ordered(self) -> ServerConfig:
        if self.max_pull_interval_s < self.pull_interval_s:
            raise ValueError(
                f"server.max_pull_interval_s={self.max_pull_interval_s} is below "
                f"server.pull_interval_s={self.pull_interval_s}: set it at least as large"
            )
        return self


class GeneralizationConfig(_Section):
    """Novel clients (paper 4.4): they join after round `join_round`; from then on the
    hypernetwork is frozen and only their embeddings (and heads for new taus) train."""

    join_round: int = Field(0, ge=0, description="0 = no generalization phase")
    novel_clients: int = Field(
        0, ge=0, description="simulation: the last N partitions are novel (node config: role)"
    )
    novel_models: list[str] = Field(
        default_factory=list,
        description="architectures of the novel clients (index mod len); [] = clients.models",
    )
    embedding_lr: float = Field(
        0.1,
        gt=0,
        description="Adam lr of the novel clients' embeddings: they train alone on a frozen "
        "hypernetwork, one step per round (docs/results.md: 2e-4 barely moves them in 8 "
        "rounds)",
    )

    @field_validator("novel_models", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _comma_list(value)


class TrackingConfig(_Section):
    """Experiment tracking (server_app/tracking.py); needs pip install -e ".[tracking]"."""

    backends: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="none, tensorboard, mlflow, or both (comma-separated)"
    )
    tensorboard_dir: str = Field("", description="event files; '' = <run directory>/tensorboard")
    mlflow_uri: str = Field(
        "", description="MLflow tracking URI; '' = sqlite:///<server.output_root>/mlflow.db"
    )
    experiment: str = Field("", description="MLflow experiment; '' = the experiment's name")
    tags: list[str] = Field(
        default_factory=list,
        description="key=value tags (the sweep runner adds experiment, method and seed)",
    )

    @field_validator("backends", mode="before")
    @classmethod
    def _backends(cls, value: Any) -> Any:
        value = _comma_list(value)
        return [] if value in (["none"], "none") else value

    @field_validator("tags", mode="before")
    @classmethod
    def _tags(cls, value: Any) -> Any:
        return _comma_list(value)


@functools.cache
def method_sections() -> dict[str, type[BaseModel]]:
    """Every method's settings model by the name of its section (`fedavgm`, `global_model`)."""
    sections: dict[str, type[BaseModel]] = {}
    for method in METHODS.values():
        settings = method.settings_class()
        if settings is not None:
            sections[getattr(settings, "section", method.name)] = settings
    return sections


def section_of(method: str) -> str | None:
    settings = get_method(method).settings_class()
    return None if settings is None else getattr(settings, "section", method)


def _problems(err: ValidationError, prefix: str = "") -> str:
    """A validation error as 'key: message; ...', every key in full dotted form."""
    out = []
    for e in err.errors():
        loc = ".".join(map(str, e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        out.append(f"{prefix}{loc}: {msg}" if loc or prefix else msg)
    return "; ".join(out)


class ExperimentConfig(_Section):
    """The experiment. Besides the sections below, a method's own settings are a section of
    their own (`method_sections`), validated by that method's model."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = Field(
        "default", description="the experiment's name, used in run directories and trackers"
    )
    method: str = Field("mh_pfedhn", description="a name in common/methods.py METHODS")
    preset: Literal["none", "paper", "paper_text"] = Field(
        "none",
        description="paper: the authors' code's settings; paper_text: the client settings of "
        "the paper's text; applied over the experiment file (see Presets)",
    )
    seed: int = Field(
        0,
        description="seeds the pool, the partition, the clients' data order, the "
        "hypernetwork's initialisation and the update order",
    )
    rounds: int = Field(5, gt=0, description="server rounds")
    engine: Literal["loop", "batched"] = Field(
        "loop",
        description="in-process runs: clients one after another, or all clients of an "
        "architecture trained together (client_app/batched.py); Flower's runtimes ignore it",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    clients: ClientsConfig = Field(default_factory=ClientsConfig)
    client: ClientTrainConfig = Field(default_factory=ClientTrainConfig)
    hypernetwork: HypernetworkConfig = Field(default_factory=HypernetworkConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    generalization: GeneralizationConfig = Field(default_factory=GeneralizationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        get_method(value)  # raises, listing the methods
        return value

    @model_validator(mode="before")
    @classmethod
    def _method_sections(cls, data: Any) -> Any:
        """Validate every method section given (with its method's model), keep only the
        active method's (with its defaults: a sweep's `--set fedprox.mu=...` reaches its Local
        runs too, where it means nothing and must not tell them apart), and refuse any other
        unknown key."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        sections = method_sections()
        unknown = sorted(set(data) - set(cls.model_fields) - set(sections))
        if unknown:
            raise ValueError(unknown_settings(unknown, sorted([*cls.model_fields, *sections])))
        for name, model in sections.items():
            if name in data and not isinstance(data[name], model):
                try:
                    data[name] = model.model_validate(data[name] or {})
                except ValidationError as err:
                    raise ValueError(_problems(err, f"{name}.")) from None
        method = data.get("method", cls.model_fields["method"].default)
        section = section_of(method) if method in METHODS else None
        for name in set(sections) - {section}:
            data.pop(name, None)
        if section is not None and section not in data:
            data[section] = sections[section]()
        return data

    @model_validator(mode="after")
    def _generalization_fits(self) -> ExperimentConfig:
        g = self.generalization
        if g.join_round >= self.rounds:
            raise ValueError(
                f"generalization.join_round={g.join_round} leaves no round for the novel "
                f"clients: it must be below rounds={self.rounds}"
            )
        if (g.novel_clients or g.novel_models) and g.join_round == 0:
            raise ValueError(
                "novel clients need generalization.join_round >= 1 (the round after which "
                "they join)"
            )
        if g.join_round and not self.method_spec.novel_clients:
            supported = sorted(m.name for m in METHODS.values() if m.novel_clients)
            raise ValueError(f"the generalization phase needs one of {supported}, not "
                             f"{self.method!r}")  # fmt: skip
        count = self.data.num_clients
        if g.novel_clients and count != "auto" and g.novel_clients >= count:
            raise ValueError(
                f"generalization.novel_clients={g.novel_clients} leaves no training client "
                f"among data.num_clients={count}"
            )
        return self

    @model_validator(mode="after")
    def _models_fit_method(self) -> ExperimentConfig:
        """A method that trains one architecture (common/methods.py) would refuse every
        client of the others at registration, and the run would go on without them."""
        models = list(dict.fromkeys(self.clients.models))
        if len(models) > 1 and not self.method_spec.heterogeneous:
            raise ValueError(
                f"{self.method} trains one architecture, but clients.models gives "
                f"{len(models)} ({', '.join(models)}): set clients.models to one of them, "
                f"e.g. clients.models={models[0]}"
            )
        return self

    @property
    def method_spec(self) -> Method:
        return get_method(self.method)

    @property
    def method_settings(self) -> Any:
        """The active method's own settings (a model of its settings class), or None."""
        section = section_of(self.method)
        return None if section is None else getattr(self, section)


# Where the paper's text and the authors' code (DangDang1895/MH-pFL) differ
# (docs/concepts/algorithm.md, "Presets"). The client defaults are the code's, by measurement.
PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "paper": {
        "hypernetwork": {"embedding_std": 0.002, "schedule": "one_by_one", "in_flight": 1},
        "client": {"lr": 5e-3, "weight_decay": 5e-4, "epochs": 1},
    },
    "paper_text": {"client": {"lr": 1e-3, "weight_decay": 1e-4, "epochs": 2}},
}


# Settings that were renamed: a clear message instead of "unknown setting".
RENAMED = {
    "hypernetwork.update_mode": "hypernetwork.schedule (sequential -> parallel_sequential, "
    "batched -> parallel_mean; one_by_one is the authors' round)",
    "hypernetwork.max_params": "server.max_params",
}


def _dotted_keys(raw: Mapping[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in raw.items():
        keys.add(f"{prefix}{key}")
        if isinstance(value, Mapping):
            keys |= _dotted_keys(value, f"{prefix}{key}.")
    return keys


def _refuse_renamed(keys: set[str], origin: str) -> None:
    old = sorted(RENAMED.keys() & keys)
    if old:
        renames = "; ".join(f"{k} is now {RENAMED[k]}" for k in old)
        raise ConfigError(f"{origin}: {renames}")


def unknown_settings(unknown: list[str], valid: list[str]) -> str:
    """Names the unknown keys, each with the valid keys spelt closest to it, then the keys of
    their section (for an unknown section, the top-level keys) rather than all of them."""
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        if close:
            hints.append(f"{key!r}: did you mean {' or '.join(map(repr, close))}?")
    sections = {key.partition(".")[0] for key in unknown}
    listed = [k for k in valid if k.partition(".")[0] in sections and "." in k]
    top = sorted({k.partition(".")[0] for k in valid})
    where = (
        f"the keys of {', '.join(sorted(sections))}: {listed}"
        if listed
        else f"the top-level keys: {top}"
    )
    return f"unknown setting(s) {unknown}; {' '.join(hints)}{' ' if hints else ''}{where}"


def leaf_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Dotted names of every leaf setting, in schema order, the methods' sections last (the
    run-config keys)."""
    if model is None:
        keys = leaf_keys(ExperimentConfig)
        for name, section in method_sections().items():
            keys += leaf_keys(section, f"{name}.")
        return keys
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += leaf_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def experiment_path(name_or_path: str) -> Path:
    """A name in configs/ (with or without .yaml) or a path to a YAML file."""
    candidates = [Path(name_or_path).expanduser()]
    if not name_or_path.endswith((".yaml", ".yml")):
        candidates.append(CONFIG_DIR / f"{name_or_path}.yaml")
    candidates.append(CONFIG_DIR / name_or_path)
    for path in candidates:
        if path.is_file():
            return path
    available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(
        f"experiment {name_or_path!r} not found: give a YAML path or one of {available}"
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return loaded


def _read_experiment(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML file; `extends: <name or path>` layers it over another experiment."""
    if path in seen:
        raise ConfigError(f"experiment files extend each other in a loop: {[*seen, path]}")
    raw = _read_yaml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = _read_experiment(experiment_path(str(parent)), (*seen, path))
    return _merge(base, raw)


def _validate(raw: Mapping[str, Any], origin: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid configuration ({origin}): {_problems(err)}") from None


def resolve_config(
    experiment: str = "default", overrides: Mapping[str, Any] | None = None
) -> ExperimentConfig:
    """YAML file, then its preset, then flat dotted overrides ("" values are skipped)."""
    path = experiment_path(experiment)
    raw = _read_experiment(path)
    flat = {k: v for k, v in (overrides or {}).items() if v != UNSET and k != EXPERIMENT_KEY}
    unknown = sorted(set(flat) - set(leaf_keys()))
    _refuse_renamed(set(flat) | _dotted_keys(raw), str(path))
    if unknown:
        raise ConfigError(unknown_settings(unknown, leaf_keys()))
    nested_overrides = _nest(flat)
    preset = nested_overrides.get("preset", raw.get("preset", "none"))
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    merged = _merge(_merge(raw, PRESETS[preset]), nested_overrides)
    return _validate(merged, f"{path} with overrides {flat}" if flat else str(path))


def config_from_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The resolved experiment for a Flower Context's run_config."""
    experiment = str(run_config.get(EXPERIMENT_KEY) or "default")
    return resolve_config(experiment, run_config)


# Settings a resumed run may change: where and how it runs, not what it computes.
OPERATIONAL = (
    "name",
    "rounds",
    "engine",
    "data.root",
    "data.download",
    "data.cache_dir",
    "data.cache_partitions",
    "data.cache_max_gb",
    "client.device",
    "client.state_dir",
    "hypernetwork.device",
    "server.min_nodes",
    "server.min_clients",
    "server.stop_on_client_error",
    "server.wait_for_nodes_s",
    "server.timeout_s",
    "server.pull_interval_s",
    "server.max_pull_interval_s",
    "server.fuse_evaluation",
    "server.evaluate_every",
    "server.output_root",
    "server.run_name",
    "server.checkpoint_every",
    "server.resume",
    "tracking.backends",
    "tracking.tensorboard_dir",
    "tracking.mlflow_uri",
    "tracking.experiment",
    "tracking.tags",
)


def defining_settings(config: ExperimentConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The flat settings that define what a run computes (a resume must keep them), of a
    config or of its dump (a run's config.yaml)."""
    flat: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            elif f"{prefix}{key}" not in OPERATIONAL:
                flat[f"{prefix}{key}"] = value

    dump = config if isinstance(config, Mapping) else config.model_dump(mode="json")
    method = dump.get("method", ExperimentConfig.model_fields["method"].default)
    own = section_of(method) if method in METHODS else None
    # other methods' sections (in a config.yaml written before they were dropped) mean nothing
    walk({k: v for k, v in dump.items() if k == own or k not in method_sections()}, "")
    return flat


def settings_changed(before: Mapping[str, Any], config: ExperimentConfig) -> list[str]:
    """Defining settings whose value differs from `before` (a checkpoint's), as
    'key: old -> new'; keys unknown to `before` count only if they are not at their default."""
    now = defining_settings(config)
    defaults = defining_settings(ExperimentConfig())
    for name, section in method_sections().items():
        defaults.update({f"{name}.{k}": v for k, v in section().model_dump(mode="json").items()})
    changed = []
    for key in sorted(now):
        old = before.get(key, defaults[key])
        if old != now[key]:
            changed.append(f"{key}: {old!r} -> {now[key]!r}")
    return changed


def toml_value(value: Any) -> str:
    """A run-config value as TOML (bool, int, float or string; Flower accepts no others)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"run-config value {value!r} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    raise TypeError(f"run-config value {value!r} must be a bool, int, float or string")


def run_config_string(run_config: Mapping[str, Any]) -> str:
    """A flat run config as one `flwr run --run-config` string of TOML values."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in run_config.items())


def run_config_toml(run_config: Mapping[str, Any]) -> str:
    """A flat run config as a TOML file for `flwr run --run-config FILE.toml` (dotted keys
    are quoted, so they stay flat keys, exactly as `-c 'data.source="..."'` gives them)."""
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in run_config.items())


def to_yaml(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------- the run-config key list
PYPROJECT = PROJECT_ROOT / "pyproject.toml"
_BEGIN = "# --- run-config keys: written by `python -m common.generated --write` ---"
_END = "# --- end of run-config keys ---"


def pyproject_keys_block() -> str:
    """The run-config keys Flower must know, one `"key" = ""` line each, from the schema."""
    lines = [_BEGIN, f'{EXPERIMENT_KEY} = "default"']
    lines += [f'"{key}" = ""' for key in leaf_keys()]
    return "\n".join([*lines, _END])


def synced_pyproject(text: str) -> str:
    """pyproject.toml's text with its run-config key block written from the schema."""
    begin, end = text.find(_BEGIN), text.find(_END)
    if begin < 0 or end < begin:
        raise ConfigError(f"{PYPROJECT.name} has no run-config key block ({_BEGIN!r} ... {_END!r})")
    return text[:begin] + pyproject_keys_block() + text[end + len(_END) :]
