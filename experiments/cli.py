"""Command-line pieces the experiment scripts share."""

from __future__ import annotations

import argparse
from typing import Any

import yaml


def setting(text: str) -> tuple[str, Any]:
    """`--set KEY=VALUE`: a dotted experiment setting, its value read as YAML (2e-4, true...)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def add_set_option(
    parser: argparse.ArgumentParser,
    help: str = "any other experiment setting, e.g. data.classes_per_client=2",
) -> None:
    parser.add_argument(
        "--set", action="append", type=setting, default=[], metavar="KEY=VALUE", help=help
    )
