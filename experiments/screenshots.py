"""Screenshots of a tracked sweep in TensorBoard and in MLflow's UI, taken in headless
Chromium (how the README's pictures were made).

    python -m experiments.screenshots outputs/sweeps/tracking_demo --out results/tracking

Starts `tensorboard` and `mlflow ui` on 127.0.0.1 for the sweep folder, loads the pages in
Chromium (`chromium`, Debian's package) and writes the PNGs; the servers are stopped after.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from deployment.processes import free_port, kill_tree

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1600,1000", "--virtual-time-budget=20000",
]  # fmt: skip


def serve(command: list[str], url: str, timeout: float = 180) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5)
            return process
        except OSError:
            time.sleep(1)
    kill_tree({process.pid})
    raise RuntimeError(f"{command[0]} did not answer at {url}")


def screenshot(url: str, out: Path, chromium: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                        f"--screenshot={out}", url], check=True, capture_output=True,
                       timeout=180)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a sweep's output folder, tracked")
    parser.add_argument("--out", type=Path, default=Path("results/tracking"))
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium not found: apt-get install chromium", file=sys.stderr)
        return 2
    sweep, bin_dir = args.sweep.resolve(), Path(sys.executable).parent
    args.out.mkdir(parents=True, exist_ok=True)
    processes = []
    try:
        port = free_port()
        processes.append(
            serve(
                [
                    str(bin_dir / "tensorboard"),
                    "--logdir",
                    str(sweep),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                f"http://127.0.0.1:{port}/",
            )
        )
        for view, name in (
            ("timeseries", "tensorboard_scalars"),
            ("hparams", "tensorboard_hparams"),
        ):
            screenshot(f"http://127.0.0.1:{port}/#{view}", args.out / f"{name}.png", chromium)
        port = free_port()
        processes.append(serve([str(bin_dir / "mlflow"), "ui", "--backend-store-uri",
                                f"sqlite:///{sweep / 'mlflow.db'}", "--host", "127.0.0.1",
                                "--port", str(port)], f"http://127.0.0.1:{port}/"))  # fmt: skip
        # the runs' metric charts (MLflow 3 opens an experiment on its GenAI overview)
        screenshot(f"http://127.0.0.1:{port}/#/experiments/1/runs?compareRunsMode=CHART",
                   args.out / "mlflow_runs.png", chromium)  # fmt: skip
    finally:
        kill_tree({p.pid for p in processes})
    print(f"written: {sorted(p.name for p in args.out.glob('*.png'))} in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
