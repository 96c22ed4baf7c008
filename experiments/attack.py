"""A hostile client against the server's defences, measured: one client sends -SCALE times its
honest delta (well formed, so no parser can refuse it) every round.

    python -m experiments.attack --set data.source=imagefolder:../shared/data/cifar10 \\
        --rounds 10 --out results/attack

Runs in-process, the same experiment four times: {no attacker, attacker} x {no defence,
server.delta_norm_bound}. Reports the honest clients' mean accuracy by round, so a defence's
cost (no attacker) and its protection (attacker) read off one table (attack.md, attack.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from flwr.app import Array, ArrayRecord, Context, Message

from client_app.app import app as client_app
from common import protocol
from common.config import resolve_config
from experiments.cli import add_set_option
from server_app.outputs import read_metrics
from simulation.run import run_inprocess

ATTACKER = 0  # partition id


class FlippingClientApp:
    """The real ClientApp, except that partition ATTACKER multiplies its dense delta by
    -scale before it answers a train message."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        attacker = int(context.node_config["partition-id"]) == ATTACKER
        if attacker and message.metadata.message_type == protocol.TRAIN and reply.has_content():
            arrays = reply.content["arrays"]
            arrays[protocol.DELTA] = Array(-self.scale * arrays[protocol.DELTA].numpy())
            reply.content["arrays"] = ArrayRecord(dict(arrays))
        return reply


def honest_mean(row: dict) -> float | None:
    per_client = row.get("client_accuracy") or {}
    honest = [v for k, v in per_client.items() if k != f"partition-{ATTACKER}"]
    return sum(honest) / len(honest) if honest else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="cifar10_homogeneous")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--scale", type=float, default=100.0)
    parser.add_argument("--bound", type=float, default=3.0, help="server.delta_norm_bound")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per client")
    parser.add_argument("--out", type=Path, default=Path("outputs/attack"))
    add_set_option(parser)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    results = {}
    for attacked in (False, True):
        for bound in (0.0, args.bound):
            name = f"{'attack' if attacked else 'honest'}-bound{bound:g}"
            run_config = {
                "experiment": args.experiment, "rounds": args.rounds,
                "server.delta_norm_bound": bound, "server.checkpoint_every": 0,
                "server.output_root": str(out), "server.run_name": name,
                "server.wait_for_nodes_s": 0, **dict(args.set),
            }  # fmt: skip
            cfg = resolve_config(args.experiment, run_config)
            shutil.rmtree(out / name, ignore_errors=True)  # a rerun measures afresh
            run_config["server.min_nodes"] = int(cfg.data.num_clients)
            cfg = resolve_config(args.experiment, run_config)
            app = FlippingClientApp(args.scale) if attacked else client_app
            run_inprocess(cfg, run_config, threads_per_client=args.threads, client_app=app)
            rows = read_metrics(out / name / "metrics.jsonl")
            results[name] = [honest_mean(r) for r in rows]
            print(name, [None if v is None else round(v, 3) for v in results[name]], flush=True)
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "honest_mean": results}
    (out / "attack.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| run | " + " | ".join(f"r{i}" for i in range(args.rounds + 1)) + " |",
             "|---|" + "---|" * (args.rounds + 1)]  # fmt: skip
    for name, values in results.items():
        cells = ["-" if v is None else f"{v:.3f}" for v in values]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "attack.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
