"""`python -m server_app.run_plot`: a run's accuracy curves as a PNG."""

from __future__ import annotations

import json

import matplotlib
import pytest

from server_app.run_plot import plot_runs

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def test_a_run_is_drawn_and_an_unreadable_one_leaves_no_figure_open(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    rows = [{"round": r, "accuracy": 0.1 * r} for r in range(4)]
    (good / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_runs([good], tmp_path / "good.png").stat().st_size > 1000
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"round": 0, "accura')
    open_before = plt.get_fignums()
    with pytest.raises(ValueError, match="line 1: Unterminated string"):
        plot_runs([good, bad], tmp_path / "both.png")
    assert plt.get_fignums() == open_before
