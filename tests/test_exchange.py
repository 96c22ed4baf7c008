"""The server's own push/pull loop: replies keyed by the message they answer, and waits between
pulls that grow while nothing arrives and drop back after a reply."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.config import ConfigError, resolve_config
from server_app import exchange as exchange_module
from server_app.exchange import Exchange


class ScriptedGrid:
    """Answers message i at pull number `arrivals[i]` (pulls counted from 1)."""

    def __init__(self, arrivals: list[int]) -> None:
        self.arrivals = arrivals
        self.pulls = 0
        self.pushed: list[object] = []

    def push_messages(self, messages):
        self.pushed = list(messages)
        return [f"m{i}" for i in range(len(self.pushed))]

    def pull_messages(self, ids):
        self.pulls += 1
        out = []
        for mid in ids:
            i = int(mid[1:])
            if self.arrivals[i] == self.pulls:
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid)))
        return out


@pytest.fixture
def sleeps(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(exchange_module.time, "sleep", waits.append)
    return waits


def messages(n: int) -> dict[str, object]:
    """Stand-ins: the exchange only passes messages on and reads replies' reply_to ids."""
    return {f"c{i}": object() for i in range(n)}


def test_waits_grow_while_nothing_arrives_and_drop_back_after_a_reply(sleeps):
    grid = ScriptedGrid([4, 9])
    replies, missing = Exchange(grid, 0.05, 0.1).run(messages(2), timeout=60)
    assert sorted(replies) == ["c0", "c1"] and missing == []
    # pulls 1-3 empty (0.05, 0.075, 0.1 capped), pull 4 brings c0 (no wait), then again
    assert sleeps == pytest.approx([0.05, 0.075, 0.1, 0.05, 0.075, 0.1, 0.1])
    assert grid.pulls == 9


def test_a_fixed_wait_when_both_intervals_are_equal(sleeps):
    Exchange(ScriptedGrid([4]), 3.0, 3.0).run(messages(1), timeout=60)
    assert sleeps == [3.0, 3.0, 3.0]


def test_the_longest_wait_may_not_be_below_the_shortest():
    with pytest.raises(ConfigError, match="server.max_pull_interval_s=0.01 is below"):
        resolve_config("default", {"server.max_pull_interval_s": 0.01})
