"""A Griffe extension for the API reference: plain-text docstrings shown as their authors laid
them out.

This project's docstrings are prose with backticks, which reads well as Markdown, plus a few
blocks laid out in aligned columns (the message table of `common/protocol.py`, usage lines).
Read as Markdown, such a block would lose its columns and its brackets would be taken for
links, so a paragraph with column alignment (a run of three spaces inside a line) becomes a
code block. In the prose, outside code spans, `*` (fnmatch patterns, products) and `<` (as in
`<run directory>`) are escaped so that they show as written instead of as emphasis or HTML.
Loaded by mkdocs.yml (mkdocstrings' `extensions`).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ALIGNED = re.compile(r"\S {3,}\S")


def _preformatted(block: list[str]) -> bool:
    return any(_ALIGNED.search(line) for line in block)


def _escaped(line: str) -> str:
    """A prose line with `*` and `<` shown literally, code spans left alone."""
    parts = re.split(r"(`[^`]*`)", line)
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = parts[i].replace("*", "\\*").replace("<", "&lt;")
    return "".join(parts)


def markdown(text: str) -> str:
    """The docstring with its laid-out paragraphs fenced as code."""
    out: list[str] = []
    block: list[str] = []
    fenced = False

    def flush() -> None:
        if block and not fenced and _preformatted(block):
            out.extend(["```text", *block, "```"])
        elif fenced or all(line.startswith("    ") for line in block):  # code already
            out.extend(block)
        else:
            out.extend(_escaped(line) for line in block)
        block.clear()

    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            flush()
            fenced = not fenced
            out.append(line)
        elif fenced:
            out.append(line)
        elif line.strip():
            block.append(line)
        else:
            flush()
            out.append(line)
    flush()
    return "\n".join(out)


class PlainTextDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
