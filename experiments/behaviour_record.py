"""Record (or compare against a recording) the metrics of short MNIST runs of every method.

A refactoring that must not change behaviour is checked by recording before it and comparing
after it, on the same machine (floating-point kernels differ between CPUs):

    python -m experiments.behaviour_record --out before.json
    python -m experiments.behaviour_record --compare before.json

Each method runs 3 rounds on 5% of MNIST with 3 clients under every round schedule it
follows (one_by_one and parallel_mean); timings are left out, everything else must be equal
bit for bit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common.config import resolve_config
from common.methods import METHODS, RENAMED_METHODS
from simulation.run import run_inprocess

TIMING_KEYS = ("seconds", "exchange_seconds", "client_seconds", "server_update_seconds",
               "server_seconds_per_client_update", "global_update_seconds")  # fmt: skip
SCHEDULES = ("one_by_one", "parallel_mean")


def cases() -> list[tuple[str, str, dict]]:
    out = []
    for name, method in METHODS.items():
        models = "lenet,mlp" if method.heterogeneous else "lenet"
        schedules = SCHEDULES if method.schedules else (SCHEDULES[0],)
        for schedule in schedules:
            out.append((name, schedule, {"clients.models": models}))
    # partial participation (the idle client is evaluated in the train exchange), and
    # MH-pFedHNGD with half the clients in phase 1 and the regenerated teacher
    out.append(("mh_pfedhn", "parallel_mean", {"server.fraction_train": 0.67}))
    out.append(
        (
            "mh_pfedhngd",
            "one_by_one",
            {"global_model.fraction": 0.5, "global_model.teacher": "regenerated"},
        )
    )
    return out


def record_case(method: str, schedule: str, extra: dict, data: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {
            "method": method,
            "rounds": 3,
            "seed": 0,
            "data.source": f"npz:{data}",
            "data.fraction": 0.05,
            "data.num_clients": 3,
            "data.cache_partitions": False,
            "client.epochs": 1,
            "hypernetwork.schedule": schedule,
            "server.output_root": tmp,
            "server.checkpoint_every": 0,
            "server.min_nodes": 1,
            **extra,
        }
        cfg = resolve_config("default", overrides)
        strategy = run_inprocess(cfg, {"experiment": "default", **overrides})
        return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in strategy.history]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the recording here")
    parser.add_argument("--compare", type=Path, help="compare against this recording")
    parser.add_argument("--data", default="../shared/data/mnist.npz")
    args = parser.parse_args(argv)
    if not args.out and not args.compare:
        parser.error("give --out or --compare")
    recording = {}
    renamed = {new: old for old, new in RENAMED_METHODS.items()}  # recordings keep old names
    for method, schedule, extra in cases():
        key = "/".join(
            [
                renamed.get(method, method),
                schedule,
                *(f"{k}={v}" for k, v in extra.items() if k != "clients.models"),
            ]
        )
        recording[key] = record_case(method, schedule, extra, args.data)
        print(key, [r.get("accuracy") for r in recording[key]], flush=True)
    if args.out:
        args.out.write_text(json.dumps(recording, indent=1, sort_keys=True))
    if args.compare:
        before = json.loads(args.compare.read_text())
        now = json.loads(json.dumps(recording, sort_keys=True))
        differ = [k for k in sorted(before) if before[k] != now.get(k)]
        for key in differ:
            print(f"DIFFERS: {key}")
        new = sorted(set(now) - set(before))
        print(f"{len(before) - len(differ)} of {len(before)} recordings identical"
              + (f"; not recorded before: {new}" if new else ""))  # fmt: skip
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
