"""The configuration reference, docs/configuration.md, written from the pydantic schema.

    python -m common.config_reference            # check: exit 1 when the page is stale
    python -m common.config_reference --write    # write it

Every setting of `common.config.ExperimentConfig` and of every method's own settings model
(`common.config.method_sections`) becomes a row: its dotted key, type, default, allowed values
and description. The experiment files of configs/, the presets and the renamed settings are
read from the same sources. `tests/test_config_reference.py` fails when the page on disk is not
what this module writes, and when a setting has no description.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from common.config import (
    CONFIG_DIR,
    PRESETS,
    PROJECT_ROOT,
    RENAMED,
    ExperimentConfig,
    method_sections,
    resolve_config,
)
from common.methods import METHODS, RENAMED_METHODS

PAGE = PROJECT_ROOT / "docs" / "configuration.md"
COMMAND = "python -m common.config_reference --write"


class UndocumentedSetting(ValueError):
    """A setting without a description: the reference would have a hole."""


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def sections() -> list[tuple[str, type[BaseModel], str]]:
    """(section name, model, who it belongs to): the top level, the schema's sections, then
    each method's own section."""
    out: list[tuple[str, type[BaseModel], str]] = [("", ExperimentConfig, "")]
    for name, field in ExperimentConfig.model_fields.items():
        if _is_section(field.annotation):
            out.append((name, field.annotation, ""))
    for name, model in method_sections().items():
        owners = [m.name for m in METHODS.values() if m.settings_class() is model]
        out.append((name, model, ", ".join(f"`{o}`" for o in owners)))
    return out


def undocumented() -> list[str]:
    """Every setting, the methods' included, that has no description."""
    missing = []
    for prefix, model, _ in sections():
        for key, field in _own_settings(model, prefix):
            if not (field.description or "").strip():
                missing.append(key)
    return missing


def _own_settings(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, FieldInfo]]:
    """A section's own leaf settings (the top level without its sub-sections)."""
    dotted = f"{prefix}." if prefix else ""
    for name, field in model.model_fields.items():
        if not _is_section(field.annotation):
            yield f"{dotted}{name}", field


# ------------------------------------------------------------------ formatting
def _type(annotation: Any) -> str:
    """A type for people: `int`, `float or "auto"`, `list of str`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        kinds = sorted({type(a).__name__ for a in args})
        return " or ".join(kinds)
    if origin in (typing.Union, types.UnionType):
        parts = []
        for arg in args:
            if typing.get_origin(arg) is Literal:
                parts += [json.dumps(a) for a in typing.get_args(arg)]
            else:
                parts.append(_type(arg))
        return " or ".join(parts)
    if origin is list:
        return f"list of {_type(args[0])}"
    return getattr(annotation, "__name__", str(annotation))


def _allowed(key: str, field: FieldInfo) -> str:
    """Allowed values (a Literal's, the method registry's) and numeric bounds."""
    if key == "method":
        return ", ".join(f"`{name}`" for name in METHODS)
    annotation = field.annotation
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is Literal:
        return ", ".join(f"`{value}`" for value in typing.get_args(annotation))
    bounds = {
        annotated_types.Gt: ("> {}", "gt"),
        annotated_types.Ge: ("≥ {}", "ge"),
        annotated_types.Lt: ("< {}", "lt"),
        annotated_types.Le: ("≤ {}", "le"),
    }
    out = []
    for item in field.metadata:
        for kind, (text, attribute) in bounds.items():
            if isinstance(item, kind):
                out.append(text.format(getattr(item, attribute)))
    return ", ".join(out)


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    """Plain text for a Markdown table cell: no HTML, no column breaks, no line breaks."""
    text = html.escape(" ".join(text.split()), quote=False)
    return text.replace("|", "\\|")


def _row(key: str, field: FieldInfo) -> str:
    if not (field.description or "").strip():
        raise UndocumentedSetting(
            f"setting {key!r} has no description: give its Field a description= "
            f"(then run {COMMAND})"
        )
    cells = [f"`{key}`", _type(field.annotation), _default(field), _allowed(key, field)]
    cells.append(_cell(field.description or ""))
    return "| " + " | ".join(cells) + " |"


def _section_text(name: str, model: type[BaseModel], owners: str) -> list[str]:
    title = f"`{name}`" if name else "Top level"
    lines = [f"### {title}", ""]
    if owners:
        lines += [f"The settings of {owners}, read only when that method runs.", ""]
    doc = model.__doc__ if name else None
    if doc and not doc.startswith(model.__name__ + "("):
        lines += [" ".join(doc.split()), ""]
    lines += ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    lines += [_row(key, field) for key, field in _own_settings(model, name)]
    return [*lines, ""]


def _summary(path: Path) -> str:
    """What an experiment file is for: its leading comment's first sentence, up to a colon."""
    comment = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    text = " ".join(comment)
    match = re.match(r"(.+?)(?:\.\s|\.$|:\s|$)", text)
    return (match.group(1) if match else text).strip()


def _experiments() -> list[str]:
    lines = [
        "| experiment | what | method | data | clients | models | partition | rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg = resolve_config(path.stem)
        cells = [
            f"`{path.stem}`",
            _cell(_summary(path)),
            f"`{cfg.method}`",
            f"`{cfg.data.source}`",
            str(cfg.data.num_clients),
            ", ".join(cfg.clients.models),
            cfg.data.partitioner,
            str(cfg.rounds),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _flat(nested: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in nested.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _presets() -> list[str]:
    lines = ["| preset | key | value |", "|---|---|---|"]
    for name, values in PRESETS.items():
        for key, value in _flat(values):
            lines.append(f"| `{name}` | `{key}` | `{json.dumps(value)}` |")
    return lines


def _renamed() -> list[str]:
    lines = ["| former | now |", "|---|---|"]
    lines += [f"| `{old}` | {_cell(new)} |" for old, new in RENAMED.items()]
    lines += [f"| `method={old}` | `method={new}` |" for old, new in RENAMED_METHODS.items()]
    return lines


INTRO = """\
# Configuration reference

<!-- Written by `python -m common.config_reference --write` from the pydantic schema
(common/config.py) and the methods' settings models; tests/test_config_reference.py fails
when this page and the schema disagree. Do not edit it by hand. -->

Every setting of an experiment: its dotted key, type, default, allowed values and meaning.
This page is generated from the schema (`common/config.py`) and from the settings model of
each method (`common/methods.py`), so it lists exactly what a run accepts.

## How a run's settings are resolved

Later wins: **schema defaults < experiment file < preset < run config**.

- An **experiment file** is a YAML file in `configs/` (pick it with `experiment="<name>"` or a
  path); it may start with `extends: <other experiment>` and list only what differs.
- A **preset** (`preset="paper"`) applies the authors' code's settings over the file.
- The **run config** overrides any key by its dotted name:
  `flwr run . -c 'client.lr=0.005 data.partitioner="noniid2"'` (values are TOML: strings in
  double quotes), the sweep files' `overrides`, or `--set KEY=VALUE` of the experiment
  scripts. A list is given as one comma-separated string: `clients.models="lenet,mlp"`.
  An empty string keeps the file's value.

A typo, an unknown key or an invalid value stops the run with a message that names the key;
a renamed key says what it is called now. Flower accepts a run-config key only if the app
declares it, so `pyproject.toml` lists every key below
(`python -m common.generated --write` writes that list; a test checks it).

A method's own settings live in a section named after it (`fedavgm.momentum`; MH-pFedHNGD's in
`global_model`) and are validated with the rest. How to add a method and its settings:
[Adding a method](adding-a-method.md).
"""


def render() -> str:
    """The whole page."""
    lines = [INTRO, "## Experiment files", ""]
    lines += ["The experiments in `configs/`, as they resolve (`auto` clients: the number of"]
    lines += ['SuperNodes). Pick one with `experiment="<name>"`.', ""]
    lines += _experiments() + [""]
    lines += ["## Presets", ""]
    lines += ["The `paper` preset is the authors' code where it differs from the paper's text."]
    lines += [""] + _presets() + [""]
    lines += ["## Settings", ""]
    for name, model, owners in sections():
        lines += _section_text(name, model, owners)
    lines += ["## Renamed settings", ""]
    lines += ["A former name stops the run with its new name.", ""] + _renamed()
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m common.config_reference",
        description="Check or write docs/configuration.md from the configuration schema.",
    )
    parser.add_argument("--write", action="store_true", help="write the page")
    args = parser.parse_args(argv)
    try:
        text = render()
    except UndocumentedSetting as err:
        print(f"error: {err}")
        return 1
    current = PAGE.read_text() if PAGE.is_file() else ""
    if text == current:
        print(f"{PAGE.relative_to(PROJECT_ROOT)} is up to date")
        return 0
    if args.write:
        PAGE.write_text(text)
        print(f"{PAGE.relative_to(PROJECT_ROOT)} written ({len(list(settings_keys()))} settings)")
        return 0
    print(f"{PAGE.relative_to(PROJECT_ROOT)} is stale: run {COMMAND}")
    return 1


def settings_keys() -> Iterator[str]:
    for prefix, model, _ in sections():
        for key, _field in _own_settings(model, prefix):
            yield key


if __name__ == "__main__":
    raise SystemExit(main())
