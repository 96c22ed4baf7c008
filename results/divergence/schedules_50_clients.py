"""tests/test_divergence.py's case (MNIST, 50 LeNet clients, 10% of the data, 1 epoch) under
every round schedule, 3 rounds each; prints and writes the pooled accuracy and test loss by
round (results/divergence/README.md). Run from the repository root:

    python results/divergence/schedules_50_clients.py ../shared/data/mnist.npz
"""

import json
import sys
import tempfile
from pathlib import Path

from client_app.app import app as client_app
from common.config import resolve_config
from server_app.run import run_experiment
from server_app.schedules import SCHEDULES
from simulation.grid import InProcessGrid

CLIENTS = 50

rows = {}
for schedule in SCHEDULES:
    with tempfile.TemporaryDirectory() as tmp:
        run_cfg = {
            "data.source": f"npz:{Path(sys.argv[1]).resolve()}", "data.fraction": 0.1,
            "data.num_clients": CLIENTS, "clients.models": "lenet", "client.epochs": 1,
            "rounds": 3, "server.min_nodes": CLIENTS, "server.wait_for_nodes_s": 0,
            "server.checkpoint_every": 0, "server.output_root": tmp,
            "hypernetwork.schedule": schedule,
        }  # fmt: skip
        cfg = resolve_config("default", run_cfg)
        grid = InProcessGrid.simulation(client_app, CLIENTS, run_cfg)
        history = run_experiment(grid, cfg, schedule).history
    rows[schedule] = [(r["round"], round(r["accuracy"], 3), round(r["loss"], 2)) for r in history]
    print(schedule, rows[schedule], flush=True)
Path(__file__).with_name("schedules_50_clients.json").write_text(json.dumps(rows, indent=1))
