"""What the README, the documentation site (docs/), the docker notes and the sweep files tell
users to type or follow works: every `python -m <module> ...` command is accepted by that
module's argument parser and names files that exist, every repository path they quote exists,
every relative link reaches a file and a heading, every page of the site is reachable from its
home page and listed in its navigation, and the tables that mirror the code (methods, node
config keys) agree with it. A renamed option or a moved file breaks a test here, not a
reader's copy-paste. The configuration reference itself is tests/test_config_reference.py."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from common.methods import METHODS, VECTOR_CLIENT

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.rglob("*.md"))
DOCUMENTS = [README, *sorted((ROOT / "docker").glob("*.md")), *PAGES]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
PACKAGES = ("common", "server_app", "client_app", "simulation", "experiments", "deployment")
COMMAND = re.compile(rf"python -m ((?:{'|'.join(PACKAGES)})\.\w+)(.*)", re.S)
SHELL_OPERATORS = {">", ">>", "|", "&&", ";", "2>&1", "&"}
# a code span that is a path in the repository, e.g. `server_app/exchange.py`, `results/idlg/`
REPO_PATH = re.compile(
    rf"^(?:{'|'.join([*PACKAGES, 'configs', 'docker', 'docs', 'examples', 'results', 'tests'])})"
    r"/[\w./-]*$"
)
MADE_BY_COMMANDS = ("docker/certs",)  # folders the documented commands create (git ignores them)
RESULTS_PAGE = DOCS / "results.md"
DESIGN_NOTES = DOCS / "design"
DATE = re.compile(r"\b20\d\d-(?:0[1-9]|1[0-2])\b")
TEST_COMMAND = "python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder"


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _without_code(text: str) -> str:
    """Prose only: fenced blocks and inline code spans removed."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]+`", "", text)


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
                found.append((_rel(path), match.group(1), words[:cut]))
    return found


COMMANDS = documented_commands()


class _Parsed(Exception):
    """Raised right after a parser accepted the arguments: nothing runs."""


def test_the_documents_quote_commands():
    """The search itself works (the documents have dozens of such commands), and it covers
    the site's pages and `python -m common.*`."""
    modules = {module for _, module, _ in COMMANDS}
    sources = {source for source, _, _ in COMMANDS}
    assert len(COMMANDS) >= 25 and {"experiments.runner", "experiments.report"} <= modules
    assert {"common.generated", "common.config_reference"} <= modules
    assert {"README.md", "docs/simulations.md", "docs/results.md"} <= sources


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


def test_every_repository_path_a_document_quotes_exists():
    missing = []
    for path in DOCUMENTS:
        for span in re.findall(r"`([^`\n]+)`", path.read_text()):
            if span.startswith(MADE_BY_COMMANDS):
                continue
            if REPO_PATH.match(span) and not (ROOT / span).exists():
                missing.append(f"{_rel(path)}: {span}")
    assert missing == []


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading (and the site's, mkdocs.yml's slugify): lower case,
    punctuation and code marks dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def _links(path: Path) -> list[str]:
    """Relative link and image targets in a document's prose."""
    targets = re.findall(r"\]\(([^)\s]+)\)", _without_code(path.read_text()))
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


def _resolve(source: Path, target: str) -> tuple[Path, str]:
    file, _, anchor = target.partition("#")
    return ((source.parent / file).resolve() if file else source), anchor


@pytest.mark.parametrize("path", DOCUMENTS, ids=_rel)
def test_every_relative_link_reaches_a_file_and_a_heading(path):
    broken = []
    for target in _links(path):
        file, anchor = _resolve(path, target)
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (file.suffix != ".md" or anchor not in _anchors(file)):
            broken.append(f"{target}: no heading #{anchor}")
        elif path.is_relative_to(DOCS) and not file.is_relative_to(DOCS):
            broken.append(f"{target}: outside docs/, which the site cannot link to")
    assert broken == []


def test_the_readme_and_the_home_page_link_into_the_docs():
    readme = {_resolve(README, t)[0] for t in _links(README)}
    assert {DOCS / "getting-started.md", DOCS / "configuration.md", DOCS / "results.md"} <= readme
    assert len(README.read_text().splitlines()) <= 250


def test_every_page_is_reachable_from_the_home_page():
    seen, todo = set(), [DOCS / "index.md"]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for target in _links(page):
            file, _ = _resolve(page, target)
            if file.suffix == ".md" and file.is_file():
                todo.append(file)
    assert [_rel(p) for p in PAGES if p not in seen] == []


def test_every_page_is_in_the_site_navigation():
    nav = set(re.findall(r"([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert pages == nav


def test_no_dated_narrative_outside_the_results():
    """Dates belong to measurements, which live on the results page (design notes record when
    they were checked). A README paragraph with a dated number must point to that page."""
    dated = []
    for page in PAGES:
        if page != RESULTS_PAGE and not page.is_relative_to(DESIGN_NOTES):
            dated += [f"{_rel(page)}: {d}" for d in DATE.findall(page.read_text())]
    for paragraph in README.read_text().split("\n\n"):
        if DATE.search(paragraph) and "docs/results.md" not in paragraph:
            dated.append(f"README.md: {paragraph[:80]!r}")
    assert dated == []


def test_no_module_or_page_cites_the_spec():
    """The specification outside this repository is not a reference a reader can follow; the
    concepts pages are (design notes quote it as a source, as they were written)."""
    cites = re.compile(r"\bSP[E]C\b")  # spelt so that a grep of the sources finds nothing
    citing = [
        _rel(p)
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
        if cites.search(p.read_text())
    ]
    citing += [_rel(p) for p in [README, *PAGES] if not p.is_relative_to(DESIGN_NOTES)
               and cites.search(p.read_text())]  # fmt: skip
    assert citing == []


def _method_rows(path: Path) -> dict[str, list[str]]:
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 5 and cells[0].strip("`") in METHODS:
            rows[cells[0].strip("`")] = cells
    return rows


@pytest.mark.parametrize("path", [README, DOCS / "index.md"], ids=_rel)
def test_the_method_table_is_the_registry(path):
    rows = _method_rows(path)
    assert list(rows) == list(METHODS)
    for name, (_, _paper, _sends, models, modules) in rows.items():
        method = METHODS[name]
        assert models.startswith("heterogeneous" if method.heterogeneous else "homogeneous"), name
        expected = {method.server.partition(":")[0]}
        if method.client != VECTOR_CLIENT:
            expected.add(method.client.partition(":")[0])
        paths = re.findall(r"`([^`]+)`", modules)
        listed = {m.removesuffix(".py").replace("/", ".") for m in paths}
        assert listed == expected, name


def test_the_node_config_keys_of_the_deployment_page_are_the_clients():
    from client_app.spec import NODE_CONFIG_KEYS

    text = (DOCS / "deployment.md").read_text()
    sentence = re.search(r"keys a site may set:(.*?)\. A site with an unknown", text, re.S)
    assert sentence is not None
    listed = re.findall(r"`([\w-]+)`", sentence.group(1))
    assert sorted(listed) == sorted(NODE_CONFIG_KEYS)


def test_the_readme_and_ci_run_the_same_tests():
    assert TEST_COMMAND in README.read_text()
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()
    assert "mkdocs build --strict" in (ROOT / ".ci" / "run").read_text()


def test_pictures_copied_into_the_site_match_the_results():
    """The site can only show files under docs/, so it shows copies of results/ pictures."""
    copies = sorted((DOCS / "assets" / "results").rglob("*.png"))
    assert copies
    stale = [
        _rel(copy)
        for copy in copies
        if copy.read_bytes()
        != (ROOT / "results" / copy.relative_to(DOCS / "assets" / "results")).read_bytes()
    ]
    assert stale == []


def test_the_site_builds_strictly(tmp_path):
    """What CI runs: any warning (a broken link or anchor, a page outside the nav, a docstring
    the API reference cannot render) fails the build."""
    missing = 'the docs extra is not installed: pip install -e ".[docs]"'
    pytest.importorskip("mkdocs", reason=missing)
    pytest.importorskip("mkdocstrings", reason=missing)
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()
