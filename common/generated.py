"""Everything in the repository that is written from the schema and the method registry, so
that adding a setting or a method never means editing a list by hand:

- pyproject.toml's run-config keys (Flower accepts `flwr run -c` only for declared keys);
- docs/configuration.md, the configuration reference (common/config_reference.py);
- the method tables of README.md and docs/index.md (between their `methods` markers).

    python -m common.generated            # check: exit 1, naming what is stale
    python -m common.generated --write    # write them all

tests/test_generated.py fails when any of them is stale.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from common import config, config_reference
from common.methods import METHODS, VECTOR_CLIENT, Method

ROOT = config.PROJECT_ROOT
METHOD_TABLES = (ROOT / "README.md", ROOT / "docs" / "index.md")
BEGIN = "<!-- methods: written by `python -m common.generated --write` -->"
END = "<!-- end of methods -->"


def _module(path: str) -> str:
    return "`" + path.partition(":")[0].replace(".", "/") + ".py`"


def method_row(method: Method) -> str:
    models = "heterogeneous" if method.heterogeneous else "homogeneous"
    if method.models_note:
        models += f" ({method.models_note})"
    modules = [_module(method.server)]
    if method.client != VECTOR_CLIENT and _module(method.client) not in modules:
        modules.append(_module(method.client))
    cells = [f"`{method.name}`", method.paper, method.sends, models, ", ".join(modules)]
    return "| " + " | ".join(cells) + " |"


def method_table() -> str:
    head = ["| method | paper | the client sends (besides its key and K) | clients' models "
            "| module |", "|---|---|---|---|---|"]  # fmt: skip
    return "\n".join([BEGIN, *head, *(method_row(m) for m in METHODS.values()), END])


def with_method_table(text: str) -> str:
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"no method table markers ({BEGIN!r} ... {END!r})")
    return text[:begin] + method_table() + text[end + len(END) :]


def targets() -> list[tuple[Path, Callable[[str], str]]]:
    """(file, what its text becomes) for every generated part."""
    out: list[tuple[Path, Callable[[str], str]]] = [
        (config.PYPROJECT, config.synced_pyproject),
        (config_reference.PAGE, lambda _: config_reference.render()),
    ]
    return out + [(path, with_method_table) for path in METHOD_TABLES]


def stale() -> list[Path]:
    """The files whose generated part differs from what the sources give."""
    return [path for path, make in targets() if make(path.read_text()) != path.read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.generated", description=__doc__)
    parser.add_argument("--write", action="store_true", help="write every stale file")
    args = parser.parse_args(argv)
    outdated = stale()
    if args.write:
        for path, make in targets():
            if path in outdated:
                path.write_text(make(path.read_text()))
                print(f"written: {path.relative_to(ROOT)}")
        return 0
    for path in outdated:
        print(f"stale: {path.relative_to(ROOT)} (python -m common.generated --write)")
    return 1 if outdated else 0


if __name__ == "__main__":
    raise SystemExit(main())
