"""Deployed rounds against in-process rounds, and where a deployed round's time goes.

    python -m experiments.deployment_benchmark --data npz:../shared/data/mnist.npz \\
        --clients 3 --models lenet,mlp --rounds 3 --out outputs/deployment_benchmark

Each variant is one real run on the local cluster (SuperLink, SuperNodes and SuperExecs as
separate processes, deployment/local_cluster.py), then the same experiment in-process:
- `flower-defaults`: what Flower's own loop gives, i.e. the ServerApp pulling every 3 s as
  `send_and_receive` does, a separate evaluate exchange each round, SuperExecs polling every
  1 s, and each ClientApp process importing everything and partitioning its data again;
- `fast`: this project's defaults (pull every 0.05 s, the evaluation riding on the next
  round's train messages, SuperExecs polling every 0.1 s, ClientApp processes forked warm,
  partitions cached on disk);
- `fast-cold`: the same, but every ClientApp process starts cold (imports torch and Flower);
- `fast-one-by-one`: the same with the `one_by_one` schedule (an exchange per client).
Writes benchmark.json and benchmark.md: seconds per round (median of rounds 1..R) and per
round the exchanges, their wall time, and per reply the client's process start-up and imports,
session (config and data), training, and the rest (pickup, polling, transport, the server).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from flwr.common.config import parse_config_args

from common.config import EXPERIMENT_KEY, resolve_config, run_config_string
from deployment.local_cluster import LocalCluster, absolute_data_path
from deployment.processes import exit_on_termination
from deployment.topology import default_nodes
from deployment.warm_clientapp import SWITCH_ENV as COLD
from experiments.cli import add_set_option
from server_app.outputs import read_metrics
from simulation.run import run_inprocess

VARIANTS = {
    "flower-defaults": (
        {"server.pull_interval_s": 3.0, "server.max_pull_interval_s": 3.0,
         "server.fuse_evaluation": False,
         "data.cache_partitions": False},
        {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0", COLD: "0"},
    ),
    "fast": ({}, {}),
    "fast-cold": ({}, {COLD: "0"}),
    "fast-one-by-one": ({"hypernetwork.schedule": "one_by_one"}, {}),
}  # fmt: skip
BASE = {"hypernetwork.schedule": "parallel_sequential"}


def _script_settings(args: argparse.Namespace, out: Path, name: str) -> dict:
    """What the script's own options say about a measured run (and where it writes)."""
    return {
        "data.source": args.data,
        "data.fraction": args.fraction,
        "data.num_clients": args.clients,
        "data.cache_dir": str(out / "cache"),
        "clients.models": args.models,
        "client.epochs": args.epochs,
        "rounds": args.rounds,
        "server.min_nodes": args.clients,
        "server.checkpoint_every": 0,
        "server.output_root": str(out),
        "server.run_name": name,
    }


def measured_config(args: argparse.Namespace, out: Path, name: str, extra: dict) -> dict:
    """The run config of one measured run: `--set` over the base round, the variant's own
    settings over those (they are what is measured), the script's options over all."""
    return {**BASE, **dict(args.set), **extra, **_script_settings(args, out, name)}


def settings(args: argparse.Namespace, out: Path, name: str, extra: dict) -> dict:
    """measured_config, with the run's folder `out/name` cleared (a rerun measures afresh)."""
    shutil.rmtree(out / name, ignore_errors=True)
    return measured_config(args, out, name, extra)


def breakdown(rows: list[dict], deployed: bool = True) -> dict:
    """Medians over rounds 1..R of the round's seconds and its parts (in-process, clients
    start no process per message: their process age is not a start-up time)."""
    rounds = [r for r in rows if r["round"] > 0]

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else 0.0

    def client(name: str) -> float:
        return median([r.get("client_seconds", {}).get(name, 0.0) for r in rounds])

    out = {
        "seconds_per_round": median([r["seconds"] for r in rounds]),
        "exchanges_per_round": median([r.get("exchanges", 0) for r in rounds]),
        "exchange_seconds": median([r.get("exchange_seconds", 0.0) for r in rounds]),
        "client_process_start": client("process") if deployed else 0.0,
        "client_session": client("session"),
        "client_train": client("train"),
        "client_handler": client("handler"),
        "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
    }
    out["waiting"] = max(
        out["seconds_per_round"]
        - out["exchanges_per_round"] * (out["client_process_start"] + out["client_handler"]),
        0.0,
    )
    return out


def run_on_cluster(
    args: argparse.Namespace, out: Path, name: str, config: dict, env: dict | None = None
) -> tuple[list[dict], float]:
    """One `flwr run` of `config` on a fresh local cluster of the arguments' sites (`env`
    over every service's); its rows and the run's wall seconds."""
    nodes = default_nodes(args.clients, args.models.split(","))
    run_config = run_config_string(config)
    with (  # a `timeout` or closed terminal stops the cluster, as Ctrl-C does
        exit_on_termination(),
        LocalCluster(nodes, out / f"{name}-cluster", service_env=env) as cluster,
    ):
        started = time.perf_counter()
        done = cluster.flwr_run(run_config, timeout=3600)
        total = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{name}: flwr run failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return read_metrics(out / name / "metrics.jsonl"), total


def add_cluster_options(parser: argparse.ArgumentParser, clients: int, rounds: int) -> None:
    """The data, sites and rounds of the measured runs, and where they go."""
    parser.add_argument("--data", default="npz:../shared/data/mnist.npz")
    parser.add_argument("--clients", type=int, default=clients)
    parser.add_argument("--models", default="lenet,mlp")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=Path)
    add_set_option(parser, help="any other setting of the measured runs (a variant's own win), "
                   "e.g. preset=paper_text")  # fmt: skip


def parse_cluster_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, prefix: str
) -> argparse.Namespace:
    """The arguments, with the data path made absolute and `--out` an absolute folder (by
    default a new one, `prefix` and a time stamp, in the system's temporary folder). Nothing
    is made yet, so a command refused later leaves nothing behind. `--set` may not redo what
    an option of the script says (it would measure one thing and record another)."""
    args = parser.parse_args(argv)
    args.data = absolute_data_path(args.data, Path.cwd())
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    args.out = (args.out or Path(tempfile.gettempdir()) / f"{prefix}-{stamp}").resolve()
    owned = {*_script_settings(args, Path(), ""), EXPERIMENT_KEY}
    if clash := sorted(owned & {key for key, _ in args.set}):
        parser.error(f"--set {', '.join(clash)}: given by the script's own options (--data, "
                     "--clients, --models, --rounds, --fraction, --epochs, --out) or, for "
                     "experiment, fixed to the default one here")  # fmt: skip
    return args


def check_measured_configs(
    parser: argparse.ArgumentParser, args: argparse.Namespace, out: Path, extras: dict[str, dict]
) -> None:
    """Every measured run's config, resolved and parsed as `flwr run` will parse it, before
    any cluster starts: a bad `--set` fails now, not in a server minutes of runs later."""
    for name, extra in extras.items():
        config = measured_config(args, out, name, extra)
        try:
            resolve_config("default", config)
            parse_config_args([run_config_string(config)])
        except Exception as error:  # ConfigError, toml_value's, click's from Flower's parser
            parser.error(f"--set: the {name} run's config: {error}")


def deployed(args: argparse.Namespace, out: Path, name: str) -> dict:
    extra, env = VARIANTS[name]
    rows, total = run_on_cluster(args, out, name, settings(args, out, name, extra), env)
    return {**breakdown(rows), "total_seconds": total}


def inprocess(args: argparse.Namespace, out: Path, name: str) -> dict:
    extra, _ = VARIANTS[name]
    config = settings(args, out, f"{name}-inprocess", extra)
    cfg = resolve_config("default", config)
    run_inprocess(cfg, config)
    return breakdown(read_metrics(out / f"{name}-inprocess" / "metrics.jsonl"), deployed=False)


def table(results: dict) -> str:
    lines = [
        "| variant | runtime | s/round | exchanges/round | exchange s | client start+imports "
        "| client data | client training | client handler "
        "| the rest (pickup, polling, transport, server) "
        "| accuracy (last round) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_runtime in results.items():
        for runtime, r in by_runtime.items():
            lines.append(
                f"| {name} | {runtime} | {r['seconds_per_round']:.2f} | "
                f"{r['exchanges_per_round']:g} | {r['exchange_seconds']:.2f} | "
                f"{r['client_process_start']:.2f} | {r['client_session']:.2f} | "
                f"{r['client_train']:.2f} | {r['client_handler']:.2f} | {r['waiting']:.2f} | "
                f"{r['final_accuracy']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cluster_options(parser, clients=3, rounds=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parse_cluster_args(parser, argv, "deployment-benchmark")
    names = args.variants.split(",")
    if unknown := [name for name in names if name not in VARIANTS]:
        parser.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    out = args.out
    check_measured_configs(parser, args, out, {name: VARIANTS[name][0] for name in names})
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        results[name] = {
            "deployed": deployed(args, out, name),
            "in-process": inprocess(args, out, name),
        }
        print(
            f"{name}: deployed {results[name]['deployed']['seconds_per_round']:.2f} s/round, "
            f"in-process {results[name]['in-process']['seconds_per_round']:.2f}",
            flush=True,
        )
    record = {"args": {**vars(args), "out": str(out)}, "results": results}
    (out / "benchmark.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "benchmark.md").write_text(table(results))
    print(table(results))
    print(f"written: {out / 'benchmark.md'}, {out / 'benchmark.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
