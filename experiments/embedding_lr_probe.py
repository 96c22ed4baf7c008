"""How fast do novel clients learn on a frozen hypernetwork, for several embedding lrs?

Trains the hypernetwork once on the training clients (up to the round before the join), then
for each `generalization.embedding_lr` continues the same state through the join and the
generalization rounds, in process; prints and writes the novel/training accuracy by round.

    python -m experiments.embedding_lr_probe 2e-4 1e-2 1e-1 \\
        --set data.source=imagefolder:../shared/data/cifar10 --out results/generalization
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from client_app.app import app as client_app
from common.config import resolve_config
from experiments.cli import add_set_option
from server_app.events import ConsoleProgress
from server_app.hypernetwork_server import HypernetworkServer
from server_app.round_loop import ResumePoint
from server_app.run import build_strategy
from simulation.grid import InProcessGrid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lrs", nargs="+", type=float)
    parser.add_argument("--experiment", default="cifar10_generalization")
    add_set_option(parser)
    parser.add_argument("--out", default="outputs/embedding_lr_probe")
    args = parser.parse_args(argv)
    base = {"experiment": args.experiment, "server.checkpoint_every": 0,
            "server.wait_for_nodes_s": 0, **dict(args.set)}  # fmt: skip
    cfg = resolve_config(args.experiment, base)
    clients = int(cfg.data.num_clients)
    base["server.min_nodes"] = clients
    join = cfg.generalization.join_round
    # the training phase alone: the novel clients are refused (no generalization phase yet)
    training = {**base, "rounds": join - 1, "generalization.join_round": 0,
                "generalization.novel_clients": 0}  # fmt: skip
    first_novel = clients - cfg.generalization.novel_clients
    nodes = [{"partition-id": i, "num-partitions": clients} for i in range(clients)]
    for node in nodes[first_novel:]:
        node["role"] = "novel"
    grid = InProcessGrid(client_app, nodes, training)
    trained = _strategy(resolve_config(args.experiment, training))
    trained.start(grid)
    state, history = trained.state.state_dict(), list(trained.history)
    curves = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for lr in args.lrs:
        run_cfg = {**base, "generalization.embedding_lr": lr}
        variant = resolve_config(args.experiment, run_cfg)
        server = HypernetworkServer.from_state_dict(copy.deepcopy(state))
        strategy = _strategy(variant, server, ResumePoint(join - 1, list(history)))
        strategy.start(InProcessGrid.simulation(client_app, clients, run_cfg))
        curves[str(lr)] = [
            {"round": r["round"], "novel_accuracy": r.get("novel_accuracy"),
             "training_accuracy": r.get("training_accuracy")}
            for r in strategy.history if r["round"] >= join
        ]  # fmt: skip
        said = [
            None if (a := c["novel_accuracy"]) is None else round(a, 3) for c in curves[str(lr)]
        ]
        print(lr, said, flush=True)  # None: a round not evaluated
        (out / "embedding_lr_probe.json").write_text(json.dumps(curves, indent=2) + "\n")
    return 0


def _strategy(cfg, state=None, resume=None):
    return build_strategy(cfg, state, observers=[ConsoleProgress()], resume=resume)


if __name__ == "__main__":
    raise SystemExit(main())
