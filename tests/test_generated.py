"""What the repository writes from the schema and the registry is current: pyproject.toml's
run-config keys, the configuration reference, the README's and the home page's method tables."""

from __future__ import annotations

from common import generated
from common.methods import METHODS, Method


def test_every_generated_part_is_current():
    assert generated.stale() == [], "run python -m common.generated --write"


def test_a_new_method_appears_in_the_tables_from_its_registry_entry(monkeypatch):
    entry = Method("mine", "a method of my own", "Me et al., 2027", "pkg.server:Mine",
                   "pkg.client:MineClient", sends="its secrets", heterogeneous=False)  # fmt: skip
    monkeypatch.setitem(METHODS, "mine", entry)
    table = generated.method_table()
    row = ("| `mine` | Me et al., 2027 | its secrets | homogeneous "
           "| `pkg/server.py`, `pkg/client.py` |")  # fmt: skip
    assert row in table.splitlines()
    assert set(generated.METHOD_TABLES) <= set(generated.stale())  # both tables now lack it
