"""A sweep file: methods x experiments (each maybe with overrides) x seeds, as a list of runs.

    name: smoke                       # optional; default: the file's name
    methods: [mh_pfedhn, mh_pfedhngd]
    experiments:
      - default                       # a name in configs/ or a path to an experiment YAML
      - experiment: cifar10_homogeneous
        overrides: {data.partitioner: noniid2}
        tag: niid2                    # optional; default: made from the overrides
        methods: [mh_pfedhn]          # optional; default: the sweep's methods
    seeds: [0, 1, 2]
    overrides:                        # dotted run-config keys, for every run
      rounds: 2

Each run is named `<experiment>[-<tag>]-<method>-s<seed>`; an experiment entry's own
overrides win over the common ones. The runner sets `experiment`, `method`, `seed`,
`server.output_root` and `server.run_name` itself, so a sweep may not override them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from common.config import (
    EXPERIMENT_KEY,
    ConfigError,
    ExperimentConfig,
    experiment_path,
    leaf_keys,
    method_sections,
    resolve_config,
    section_of,
    unknown_settings,
)
from common.methods import METHODS

RESERVED_KEYS = {
    EXPERIMENT_KEY: "list it under `experiments`",
    "method": "list it under `methods`",
    "seed": "list it under `seeds`",
    "server.output_root": "the runner's --out sets it",
    "server.run_name": "the runner names each run",
    "tracking.tags": "the runner tags each run with its experiment, method and seed",
}
CHECKPOINT_EVERY = 10
CLIENT_STATE = "client_state"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$"
AUTO_TAG_MAX = 24

OverrideValue = bool | int | float | str | list[str]


class SweepError(ValueError):
    """A sweep file that cannot be run; the message says what to change."""


def known_methods() -> tuple[str, ...]:
    """The methods ExperimentConfig accepts (common/methods.py)."""
    return tuple(METHODS)


def _check_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    valid = set(leaf_keys())
    sections = method_sections()
    for key, value in overrides.items():
        if key in RESERVED_KEYS:
            raise ValueError(f"{key!r} cannot be overridden in a sweep: {RESERVED_KEYS[key]}")
        if key not in valid:
            raise ValueError(unknown_settings([key], leaf_keys()))
        section, _, name = key.partition(".")
        # a method's own setting: checked here, once, not as the problem of some run
        if section in sections:
            try:
                sections[section].model_validate({name: value})
            except ValidationError as err:
                problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
                raise ValueError(f"{key}={value!r}: {problems}") from None
    # Lists (clients.models) travel as comma-separated strings, as on Flower's command line.
    return {k: ",".join(v) if isinstance(v, list) else v for k, v in overrides.items()}


def _check_methods(methods: list[str] | None) -> list[str] | None:
    if methods is None:
        return None
    known = known_methods()
    unknown = [m for m in methods if known and m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(known)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"a method is listed twice: {methods}")
    return methods


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", str(value)).strip("_") or "x"


def auto_tag(overrides: Mapping[str, Any]) -> str:
    """A short readable tag for an override variant (a hash when that would be long)."""
    if not overrides:
        return ""
    parts = []
    for key, value in sorted(overrides.items()):
        leaf = key.rsplit(".", 1)[-1]
        parts.append(_slug(value) if isinstance(value, str) else f"{leaf}{_slug(value)}")
    tag = "_".join(parts)
    if len(tag) <= AUTO_TAG_MAX:
        return tag
    digest = hashlib.sha256(json.dumps(dict(overrides), sort_keys=True).encode()).hexdigest()
    return f"v{digest[:8]}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExperimentEntry(_Strict):
    experiment: str = Field(description="a name in configs/ or a path to an experiment YAML")
    overrides: dict[str, OverrideValue] = Field(default_factory=dict)
    tag: str | None = Field(None, pattern=NAME_PATTERN, description="run-name suffix")
    methods: list[str] | None = Field(
        None, min_length=1, description="this experiment's methods (default: the sweep's)"
    )

    @field_validator("experiment")
    @classmethod
    def _exists(cls, ref: str, info: ValidationInfo) -> str:
        """A configs/ name stays a name; a path becomes absolute (tried first relative to the
        sweep file), so that every engine and working directory finds it."""
        if "/" not in ref and not ref.endswith((".yaml", ".yml")):
            experiment_path(ref)  # raises ConfigError (a ValueError) when missing
            return ref
        base = (info.context or {}).get("base")
        local = Path(base, ref).expanduser() if base is not None else None
        if local is not None and not Path(ref).is_absolute() and local.is_file():
            return str(local.resolve())
        path = experiment_path(ref)
        return str(path.resolve())

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        return _check_overrides(overrides)

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: list[str] | None) -> list[str] | None:
        return _check_methods(methods)

    @property
    def label(self) -> str:
        """The experiment's name in run names and tables: file stem plus the variant's tag."""
        tag = auto_tag(self.overrides) if self.tag is None else self.tag
        stem = _slug(Path(self.experiment).stem)
        return f"{stem}-{tag}" if tag else stem


class Sweep(_Strict):
    name: str | None = Field(None, pattern=NAME_PATTERN)
    methods: list[str] | None = Field(None, min_length=1)  # each entry's, unless it has its own
    experiments: list[ExperimentEntry] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    overrides: dict[str, OverrideValue] = Field(default_factory=dict)

    @field_validator("experiments", mode="before")
    @classmethod
    def _names(cls, entries: Any) -> Any:
        if isinstance(entries, list):
            return [{"experiment": e} if isinstance(e, str) else e for e in entries]
        return entries

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        return _check_overrides(overrides)

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: list[str] | None) -> list[str] | None:
        return _check_methods(methods)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"a seed is listed twice: {seeds}")
        return seeds

    @model_validator(mode="after")
    def _every_experiment_has_methods(self) -> Sweep:
        bare = [e.label for e in self.experiments if not (e.methods or self.methods)]
        if bare:
            raise ValueError(
                f"experiments {bare} have no methods: give `methods` at the top of the sweep "
                "or in each experiment's entry"
            )
        return self

    @model_validator(mode="after")
    def _unique_labels(self) -> Sweep:
        labels = [e.label for e in self.experiments]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(
                f"experiments {repeated} appear more than once: give the variants distinct "
                "`overrides` or `tag`s"
            )
        return self

    def runs(self, settings: Mapping[str, Any] | None = None) -> list[Run]:
        """Every (experiment, seed, method) run; methods vary fastest, so consecutive runs
        share their data (decoded and partitioned once per experiment and seed). `settings`
        (the runner's `--set`) win over the file's overrides and keep the runs' names, so
        that e.g. `rounds=20` makes a first pass that the file's own rounds later extend."""
        try:
            extra = _check_overrides(dict(settings or {}))
        except ValueError as err:
            raise SweepError(f"--set: {err}") from None
        out = []
        for entry in self.experiments:
            overrides = {**self.overrides, **entry.overrides, **extra}
            for seed in self.seeds:
                for method in entry.methods or self.methods or ():
                    out.append(
                        Run(
                            name=f"{entry.label}-{method}-s{seed}",
                            experiment=entry.experiment,
                            label=entry.label,
                            method=method,
                            seed=seed,
                            overrides=overrides,
                        )
                    )
        return out


@dataclass(frozen=True)
class Run:
    name: str
    experiment: str  # as the run config's `experiment`: a configs/ name or an absolute path
    label: str  # the experiment (with its variant tag) in tables and plots
    method: str
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)

    def base_config(self, output_root: str | Path) -> dict[str, Any]:
        return {
            EXPERIMENT_KEY: self.experiment,
            **self.overrides,
            "seed": self.seed,
            "method": self.method,
            "server.output_root": str(Path(output_root).expanduser().resolve()),
            "server.run_name": self.name,
            "tracking.tags": f"experiment={self.label},method={self.method},seed={self.seed}",
        }

    def resolve(self, output_root: str | Path) -> tuple[ExperimentConfig, dict[str, Any]]:
        """The resolved configuration and the flat run config both engines get.

        The number of clients must be fixed (data.num_clients an integer). Unless overridden,
        the server waits for all of them (server.min_nodes), so every runtime starts with the
        same clients, and stops the run naming the reasons if it refuses any of them
        (server.min_clients: a simulated client is the experiment's own, so a refusal is a
        mistake, e.g. a model that does not fit the method or the data, not an attack to
        ride out), or when a client's code raises (server.stop_on_client_error); it
        checkpoints every CHECKPOINT_EVERY rounds; and the clients keep their state in the
        run's folder (client.state_dir), so that an interrupted run continues.
        """
        run_config = self.base_config(output_root)
        try:
            cfg = resolve_config(self.experiment, run_config)
        except ConfigError as err:
            raise SweepError(f"run {self.name}: {err}") from None
        num_clients = cfg.data.num_clients
        if not isinstance(num_clients, int):
            raise SweepError(
                f"run {self.name}: data.num_clients is {num_clients!r}; a sweep needs the "
                "number of clients: set data.num_clients to an integer in the experiment file "
                "or the sweep's overrides"
            )
        defaults = {
            "server.min_nodes": num_clients,
            "server.min_clients": num_clients,
            "server.stop_on_client_error": True,
            "server.checkpoint_every": CHECKPOINT_EVERY,
            "client.state_dir": str(Path(output_root, self.name, CLIENT_STATE).resolve()),
        }
        for key, value in defaults.items():
            if key not in self.overrides:
                run_config[key] = value
        return resolve_config(self.experiment, run_config), run_config

    def describe(self) -> dict[str, Any]:
        """What the runner writes beside the run's outputs (sweep_run.json)."""
        return {
            "run_name": self.name,
            "experiment": self.label,
            "experiment_file": self.experiment,
            "method": self.method,
            "seed": self.seed,
            "overrides": self.overrides,
        }


def _errors(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        loc = ".".join(str(part) for part in e["loc"] if not str(part).startswith("function-"))
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = (f"unknown key (allowed: {', '.join(Sweep.model_fields)}; an experiment "
                       f"entry: {', '.join(ExperimentEntry.model_fields)})")  # fmt: skip
        problems.append(f"{loc}: {message}" if loc else message)
    return "; ".join(problems)


def parse_sweep(raw: Any, origin: str = "sweep", base: Path | None = None) -> Sweep:
    """Validate a sweep given as a mapping; experiment paths may be relative to `base`."""
    if not isinstance(raw, dict):
        raise SweepError(f"{origin}: the top level must be a mapping (methods, experiments, ...)")
    try:
        return Sweep.model_validate(raw, context={"base": base})
    except ValidationError as err:
        raise SweepError(f"invalid sweep ({origin}): {_errors(err)}") from None


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path).expanduser()
    if not path.is_file():
        raise SweepError(f"sweep file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {err}") from None
    raw = raw if raw is not None else {}
    if isinstance(raw, dict) and raw.get("name") is None:
        raw = {**raw, "name": _slug(path.stem)}
    return parse_sweep(raw, str(path), base=path.parent)


def unused_settings(settings: Mapping[str, Any], runs: list[Run]) -> list[str]:
    """The `--set` keys of a method's own section that no run's method reads (they reach
    every run but change none: most likely a mistake in the method or the key)."""
    used = {section_of(run.method) for run in runs}
    sections = method_sections()
    return [k for k in settings if k.partition(".")[0] in sections.keys() - used]


def plan(
    sweep: Sweep, output_root: str | Path, settings: Mapping[str, Any] | None = None
) -> list[tuple[Run, ExperimentConfig, dict]]:
    """Every run with its resolved configuration, checked before anything runs."""
    runs = sweep.runs(settings)
    return [(run, *run.resolve(output_root)) for run in runs]
