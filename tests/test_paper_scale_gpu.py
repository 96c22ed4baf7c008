"""The prepared GPU script (issue 25 step 7) runs end to end, here on the CPU with a tiny data
set and two rounds: a GPU session must not be spent on a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_the_paper_scale_script_runs_copies_its_curves_and_reports(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 40)
    images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    data = tmp_path / "cifar10.npz"  # the name gives its defaults
    np.savez(data, x_train=images, y_train=labels, x_test=images[:50], y_test=labels[:50])
    results = tmp_path / "results"
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # this venv's python first
    env = {**os.environ, "PAPER_SCALE_OUT": str(tmp_path / "out"),
           "PAPER_SCALE_RESULTS": str(results), "PATH": path}  # fmt: skip
    settings = ["rounds=2", "client.device=cpu", "hypernetwork.device=cpu",
                f"data.source=npz:{data}", "data.num_clients=4"]  # fmt: skip
    done = subprocess.run(
        ["bash", str(ROOT / "experiments" / "paper_scale_gpu.sh"), "300", "--only", "lenet50",
         *(arg for s in settings for arg in ("--set", s))],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = [p for p in results.iterdir() if p.is_dir()]
    assert "lenet50" in run.name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]  # round 0: the initial evaluation
    assert json.loads((run / "summary.json").read_text())["rounds"] == 2
    assert (results / "results.md").is_file()


def test_the_paper_scale_script_fails_when_a_run_fails_and_refuses_out(tmp_path):
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    env = {**os.environ, "PAPER_SCALE_OUT": str(tmp_path / "out"),
           "PAPER_SCALE_RESULTS": str(tmp_path / "results"), "PATH": path}  # fmt: skip
    script = str(ROOT / "experiments" / "paper_scale_gpu.sh")
    missing = ["--set", f"data.source=npz:{tmp_path / 'missing.npz'}", "--set", "rounds=1",
               "--set", "client.device=cpu", "--set", "hypernetwork.device=cpu"]  # fmt: skip
    failed = subprocess.run(["bash", script, "120", "--only", "lenet50", *missing], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert failed.returncode != 0, failed.stdout[-2000:]
    assert "FAILED cifar10_homogeneous-lenet50" in failed.stderr
    refused = subprocess.run(["bash", script, "10", "--out", "x"], env=env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "PAPER_SCALE_OUT" in refused.stderr
