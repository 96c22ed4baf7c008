"""What the README, the docker notes and the sweep files tell users to type or follow works:
every `python -m <module> ...` command is accepted by that module's argument parser and names
files that exist, and every link in the README reaches a heading or a file. A renamed option
or a moved file breaks a test here, not a reader's copy-paste."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docker").glob("*.md"))]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
COMMAND = re.compile(r"python -m ((?:experiments|server_app|deployment|simulation)\.\w+)(.*)", re.S)
SHELL_OPERATORS = {">", ">>", "|", "&&", ";", "2>&1", "&"}


def _markdown_snippets(text: str) -> list[str]:
    """Fenced code lines (a trailing backslash continues them) and inline code spans."""
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    lines = [line for block in fenced for line in block.replace("\\\n", " ").splitlines()]
    return lines + [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]


def _sweep_snippets(text: str) -> list[str]:
    """The usage lines in a sweep file's leading comment."""
    comment = "\n".join(line.lstrip("#")[1:] for line in text.splitlines() if line.startswith("#"))
    return comment.replace("\\\n", " ").splitlines()


def documented_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    sources = [(p, _markdown_snippets) for p in DOCUMENTS] + [(p, _sweep_snippets) for p in SWEEPS]
    for path, snippets in sources:
        for snippet in snippets(path.read_text()):
            match = COMMAND.search(snippet)
            if match is None:
                continue
            words = shlex.split(match.group(2), comments=True)
            cut = next((i for i, w in enumerate(words) if w in SHELL_OPERATORS), len(words))
            if words[:cut]:  # a bare `python -m x` in prose names the tool, it is not a command
                found.append((path.relative_to(ROOT).as_posix(), match.group(1), words[:cut]))
    return found


COMMANDS = documented_commands()


class _Parsed(Exception):
    """Raised right after a parser accepted the arguments: nothing runs."""


def test_the_documents_quote_commands():
    """The search itself works (the README has dozens of such commands)."""
    modules = {module for _, module, _ in COMMANDS}
    assert len(COMMANDS) >= 25 and {"experiments.runner", "experiments.report"} <= modules


@pytest.mark.parametrize(
    "source, module, argv", COMMANDS, ids=[f"{s}:{m}:{i}" for i, (s, m, _) in enumerate(COMMANDS)]
)
def test_a_documented_command_is_accepted(source, module, argv, monkeypatch, capsys):
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse_args(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    monkeypatch.chdir(ROOT)
    main = importlib.import_module(module).main
    with pytest.raises(_Parsed):
        try:
            main(argv) if "argv" in main.__code__.co_varnames else main()
        except SystemExit:
            pytest.fail(f"{source}: `python -m {module} {shlex.join(argv)}` is refused:\n"
                        f"{capsys.readouterr().err}")  # fmt: skip
    for word in argv:
        if word.startswith("configs/"):
            assert (ROOT / word).is_file(), f"{source}: {word} does not exist"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_in_page_link_of_the_readme_reaches_a_heading():
    text = (ROOT / "README.md").read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) >= 17  # the contents list alone links every section
    assert [link for link in links if link not in anchors] == []


def test_every_file_the_readme_links_or_shows_exists():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(((?:results|configs|docker|deployment|examples)/[^)#\s]+)\)", text)
    assert targets
    assert [t for t in targets if not (ROOT / t).exists()] == []
