"""A finished run as it stood at an earlier round, for comparing runs of different lengths at
equal rounds (e.g. a 150-round Table 7 run's first 80 rounds beside an 80-round sweep).

    python -m experiments.truncate SRC_RUN DST_RUN --rounds 80 [--experiment NAME]

Writes DST_RUN/config.yaml (`rounds: N`), metrics.jsonl (the rows up to round N), summary.json
(recomputed as an N-round run writes it; nodes never admitted, which metrics.jsonl does not
record, are those of the source's summary first refused by round N, with their counts and last
reasons as the whole run saw them) and sweep_run.json (the experiment name the report
groups it under, and `truncated_from`). An N-round run computes exactly the first N rounds of a
longer run of the same config and seed, which is why raising `rounds` extends a run
(docs/concepts/round.md); tests/test_truncate.py checks the equality end to end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from server_app.outputs import RunRecorder, json_line, read_metrics
from server_app.round_log import run_summary


def truncate(source: Path, target: Path, rounds: int, experiment: str | None = None) -> dict:
    """Write `target` as `source` stood after `rounds` rounds; returns its summary."""
    config = yaml.safe_load((source / "config.yaml").read_text())
    rows = read_metrics(source / "metrics.jsonl")
    planned = int(config["rounds"])
    if not 0 < rounds <= planned or not any(r["round"] == rounds for r in rows):
        raise ValueError(
            f"{source} has no round {rounds} to stop at (it planned {planned} rounds and "
            f"logged up to round {max((r['round'] for r in rows), default=-1)})"
        )
    if target.exists():
        raise ValueError(f"{target} exists; choose a new folder")
    info_path = source / "sweep_run.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    kept = [r for r in rows if r["round"] <= rounds]
    summary = run_summary(kept)
    if unadmitted := unadmitted_by(source, rounds):
        summary["unadmitted_nodes"] = unadmitted
    target.mkdir(parents=True)
    (target / "config.yaml").write_text(yaml.safe_dump({**config, "rounds": rounds},
                                                       sort_keys=False))  # fmt: skip
    recorder = RunRecorder(target)  # the files as a run writes them
    recorder.metrics_path.write_text("".join(json_line(r) + "\n" for r in kept))
    recorder.run_finished(summary)
    info = {  # the source's run_config and overrides name its own length: kept apart
        "run_name": target.name,
        "experiment": experiment or info.get("experiment") or config.get("name", target.name),
        "method": info.get("method", config.get("method")),
        "seed": info.get("seed", config.get("seed", 0)),
        "truncated_from": {
            "run": str(source),
            "rounds": planned,
            "kept_rounds": rounds,
            "sweep_run": info,
        },  # fmt: skip
    }
    (target / "sweep_run.json").write_text(json.dumps(info, indent=2) + "\n")
    return summary


def unadmitted_by(source: Path, rounds: int) -> dict[str, dict]:
    """The source summary's nodes never admitted that were refused by round `rounds`."""
    path = source / "summary.json"
    nodes = json.loads(path.read_text()).get("unadmitted_nodes", {}) if path.is_file() else {}
    return {  # a summary of before first_round was recorded: known refused by its last round
        node: entry
        for node, entry in nodes.items()
        if entry.get("first_round", entry["last_round"]) <= rounds
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.truncate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("source", type=Path, help="a run folder (config.yaml, metrics.jsonl)")
    parser.add_argument("target", type=Path, help="the new run folder to write")
    parser.add_argument("--rounds", type=int, required=True, help="the round to stop at")
    parser.add_argument("--experiment", help="the experiment name the report groups it under")
    args = parser.parse_args(argv)
    try:
        summary = truncate(args.source, args.target, args.rounds, args.experiment)
    except (OSError, ValueError, KeyError, yaml.YAMLError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.target}: {args.rounds} rounds, final accuracy {summary.get('final_accuracy')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
