"""Deployed round time against clients in flight, measured and modelled.

    python -m experiments.in_flight_deployed --data npz:../shared/data/mnist.npz \\
        --clients 6 --in-flight 1,2,3,6 --rounds 4 --out outputs/in_flight_deployed

Runs MH-pFedHN's `one_by_one` round on the local cluster (SuperLink, SuperNodes, SuperExecs as
separate processes) once per c in `--in-flight`, and once with `parallel_mean` (one exchange
per round), then models the round time of more sites from what the c = 1 run measured:

- E, the time of one exchange (push to reply: the client's pickup latency, its training and
  transport), the c = 1 run's exchange seconds per exchange;
- S, the server's time per client (its step, generating the next vector, bookkeeping): the
  c = 1 round's time outside exchanges, divided by the clients.

Client j of a round is sent its vector when client j - c has been stepped (or at the round's
start), its reply is there E later, and steps are taken in order, each S long:
sent_j = done_{j-c}, done_j = max(sent_j + E, done_{j-1}) + S; the round takes done_n plus its
evaluation exchange (E). For c = 1 that is the measured round exactly. The model assumes every
site as fast as the measured mean and a server that steps one client at a time.
Writes in_flight_deployed.json and .md: measured s/round per c (with the model's figure for
the same c, a check of the model, and the model again with the exchange time that c's own run
measured: on one machine the sites share its cores, so an exchange slows as c grows, which
separate site machines would not), and the modelled s/round for 10 and 50 sites.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from experiments.deployment_benchmark import (
    add_cluster_options,
    check_measured_configs,
    parse_cluster_args,
    run_on_cluster,
    settings,
)


def modelled_round_seconds(
    clients: int, in_flight: int, exchange_s: float, server_s: float
) -> float:
    """The round time of `clients` sites with `in_flight` clients in flight (see the module
    docstring): each exchange takes exchange_s, each client's step server_s; the round's
    evaluation is one more exchange."""
    done: list[float] = []
    for j in range(clients):
        sent = done[j - in_flight] if j >= in_flight else 0.0
        previous = done[j - 1] if j else 0.0
        done.append(max(sent + exchange_s, previous) + server_s)
    return (done[-1] if done else 0.0) + exchange_s


def measured(rows: list[dict]) -> dict:
    """Medians over rounds 1..R (round 0 is the evaluation alone)."""
    rounds = [r for r in rows if r["round"] > 0]

    def median(name: str) -> float:
        return statistics.median(float(r.get(name) or 0.0) for r in rounds)

    return {
        "seconds_per_round": median("seconds"),
        "exchanges_per_round": median("exchanges"),
        "exchange_seconds": median("exchange_seconds"),
        "server_update_seconds": median("server_update_seconds"),
        "clients_trained": median("clients_trained"),
        "clients_in_flight": median("clients_in_flight"),
        "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
    }


def variants(values: list[int]) -> dict[str, dict]:
    """The measured runs: one_by_one with each c in flight, then the parallel round."""
    runs = {f"c{c}": {"hypernetwork.schedule": "one_by_one", "hypernetwork.in_flight": c}
            for c in values}  # fmt: skip
    return {**runs, "parallel_mean": {"hypernetwork.schedule": "parallel_mean"}}


def run_variant(args: argparse.Namespace, out: Path, name: str, extra: dict) -> dict:
    rows, total = run_on_cluster(args, out, name, settings(args, out, name, extra))
    return {**measured(rows), "total_seconds": total}


def per_exchange(one_by_one: dict) -> tuple[float, float]:
    """(E, S) from the c = 1 run, whose exchanges do not overlap: exchange seconds per
    exchange, and the round's time outside exchanges per client."""
    clients = max(one_by_one["clients_trained"], 1.0)
    exchange_s = one_by_one["exchange_seconds"] / max(one_by_one["exchanges_per_round"], 1.0)
    rest = one_by_one["seconds_per_round"] - one_by_one["exchange_seconds"]
    return exchange_s, max(rest, 0.0) / clients


def table(results: dict, model: dict, clients: int) -> str:
    lines = [
        f"Measured: {clients} sites on the local cluster (median of rounds 1..R). Modelled from "
        f"the c = 1 run: E = {model['exchange_s']:.2f} s per exchange, S = "
        f"{model['server_s']:.3f} s per client on the server.",
        "",
        "| variant | clients in flight | measured s/round | modelled s/round | s per exchange "
        "| modelled with it | exchanges/round | accuracy (last round) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        c = int(r["clients_in_flight"] or 0)
        own_e = r["exchange_seconds"] / max(r["exchanges_per_round"], 1.0)
        guess, own = (
            (modelled_round_seconds(clients, c, e, model["server_s"]) for e in
             (model["exchange_s"], own_e))
            if name.startswith("c") else (float("nan"), float("nan"))
        )  # fmt: skip
        lines.append(f"| {name} | {c} | {r['seconds_per_round']:.2f} | {guess:.2f} | "
                     f"{own_e:.2f} | {own:.2f} | {r['exchanges_per_round']:g} | "
                     f"{r['final_accuracy']:.4f} |")  # fmt: skip
    lines += ["", "| sites | clients in flight | modelled s/round | x faster than c = 1 |",
              "|---:|---:|---:|---:|"]  # fmt: skip
    for sites, rows in model["sites"].items():
        base = rows["1"]
        for c, seconds in rows.items():
            lines.append(f"| {sites} | {c} | {seconds:.1f} | {base / seconds:.1f} |")
    return "\n".join(lines) + "\n"


def model_sites(text: str) -> dict[str, list[str]]:
    """`--model-sites` ("10:1,2,5;50:1,5"): the values of c to model per site count, each
    with c = 1 (the baseline the table divides by) and every c in 1..sites."""
    sites: dict[str, list[str]] = {}
    for spec in text.split(";"):
        count, _, values = spec.partition(":")
        try:
            n, cs = int(count), [int(c) for c in values.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{spec!r} is not sites:c,c,...") from None
        if 1 not in cs or not all(1 <= c <= n for c in cs):
            raise argparse.ArgumentTypeError(f"{spec!r}: each c in 1..{n}, and c = 1 among them")
        sites[str(n)] = [str(c) for c in cs]
    return sites


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cluster_options(parser, clients=6, rounds=4)
    parser.add_argument("--in-flight", default="1,2,3,6", help="values of c to run")
    parser.add_argument("--model-sites", type=model_sites, default="10:1,2,5,10;50:1,5,10,25,50",
                        help="sites:c,c,...;... to model from the c = 1 run")  # fmt: skip
    args = parse_cluster_args(parser, argv, "in-flight-deployed")
    out = args.out
    try:
        values = [int(c) for c in args.in_flight.split(",")]
    except ValueError:
        parser.error(f"--in-flight {args.in_flight!r}: integers separated by commas")
    if 1 not in values or min(values) < 1:
        parser.error("--in-flight: values of at least 1, with 1 among them (the model is fitted "
                     "to that run)")  # fmt: skip
    runs = variants(values)
    check_measured_configs(parser, args, out, runs)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name, extra in runs.items():
        results[name] = run_variant(args, out, name, extra)
        print(f"{name}: {results[name]['seconds_per_round']:.2f} s/round", flush=True)
    exchange_s, server_s = per_exchange(results["c1"])
    model: dict = {"exchange_s": exchange_s, "server_s": server_s, "sites": {}}
    for sites, cs in args.model_sites.items():
        model["sites"][sites] = {
            c: modelled_round_seconds(int(sites), int(c), exchange_s, server_s) for c in cs
        }
    record = {"args": {**vars(args), "out": str(out)}, "results": results, "model": model}
    (out / "in_flight_deployed.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "in_flight_deployed.md").write_text(table(results, model, args.clients))
    print(table(results, model, args.clients))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
