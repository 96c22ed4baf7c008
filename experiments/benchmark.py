"""Benchmark: the per-client loop against the batched engine, and Flower against in-process.

Each measurement is one real run (the ServerApp's `run_experiment` with in-process ClientApps)
in a child process of its own, so that its peak memory is its own:

    python -m experiments.benchmark --data imagefolder:../shared/data/cifar10 \\
        --clients 10 --rounds 2 --out outputs/benchmark [--devices cpu,cuda] [--flower]

Cases: `lenet` (homogeneous LeNet) and `five` (lenet, vgg8, resnet10, resnet12, resnet18), each
with `engine: loop` and `engine: batched` on every requested device, side by side in one
invocation. Writes benchmark.json and benchmark.md: seconds per round, client-samples per
second (local training samples per second of round time) beside those of a bare PyTorch loop
training the same models on the same data (`bare_torch`: how close a round gets to the torch
limit), server seconds per client update,
peak memory (resident set of the child; CUDA: peak allocated), and the accuracy reached, so
that a speed-up never hides a different result. `--flower` adds the same small run through
`flwr run` (Ray) next to the in-process engines. Rows come per torch thread count per client
(`--threads 1,2`): with 1 thread the batched engine on the CPU trains 2 clients at once on 2
cores, as Ray does with `client-resources-num-cpus=1`. `--repeats N` runs every row N times,
interleaved, and reports the median (timings on a shared machine are noisy) and the range.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.cli import add_set_option

if TYPE_CHECKING:  # the parent imports no torch: each measured row runs in a child process
    from common.config import ExperimentConfig

CASES = {
    "lenet": "lenet",
    "five": "lenet,vgg8,resnet10,resnet12,resnet18",
}


def run_config(args: argparse.Namespace, case: str, engine: str, device: str) -> dict:
    return {
        "experiment": "default",
        "method": args.method,
        "engine": engine,
        "hypernetwork.schedule": args.schedule,
        "seed": args.seed,
        "rounds": args.rounds,
        "data.source": args.data,
        "data.download": False,
        "data.num_clients": args.clients,
        "data.partitioner": "noniid1",
        "clients.models": CASES[case],
        "client.epochs": args.epochs,
        "client.device": device,
        "hypernetwork.device": device,
        "server.min_nodes": args.clients,
        "server.wait_for_nodes_s": 0,
        "server.checkpoint_every": 0,
        **dict(args.set),
    }


# ------------------------------------------------------------------ one measurement
def child(spec: dict) -> dict:
    """Run one configuration in this process; return what it measured."""
    import torch

    from client_app.data import load_client_data
    from client_app.spec import client_spec
    from common.config import resolve_config
    from server_app.outputs import read_metrics
    from simulation.run import run_inprocess

    rc = {**spec["run_config"], "server.output_root": spec["out"], "server.run_name": "run"}
    shutil.rmtree(Path(spec["out"], "run"), ignore_errors=True)  # a rerun's measurement
    cfg = resolve_config("default", rc)
    if cfg.client.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    cores = len(os.sched_getaffinity(0))
    run_inprocess(cfg, rc, threads_per_client=spec["threads"],
                  parallel_clients=max(cores // spec["threads"], 1))  # fmt: skip
    total = time.perf_counter() - started
    result = summary(read_metrics(Path(spec["out"], "run", "metrics.jsonl")), total)
    count = int(cfg.data.num_clients)
    nodes = [{"partition-id": i, "num-partitions": count} for i in range(count)]
    sizes = [len(load_client_data(client_spec(n, cfg), cfg.seed).y_train) for n in nodes]
    seconds = result["seconds_per_round"]
    result["client_samples_per_second"] = sum(sizes) * cfg.client.epochs / seconds
    if cfg.client.device.startswith("cuda"):
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    torch.set_num_threads(spec["threads"])
    result["bare_torch_samples_per_second"] = bare_torch(cfg, nodes)
    return result


def bare_torch(cfg: ExperimentConfig, nodes: list[dict]) -> float:
    """Training samples per second of a bare PyTorch loop (torch.optim.SGD, cross-entropy,
    the same clipping, batch size, models, data and memory format) over every client of the
    run, one after another: what local training alone costs, no federation around it."""
    import torch
    import torch.nn.functional as F

    from client_app.data import load_client_data
    from client_app.spec import client_spec
    from client_app.training import memory_format_for
    from common.models import build_model

    c = cfg.client
    samples, seconds = 0, 0.0
    for node in nodes:
        spec = client_spec(node, cfg)
        data = load_client_data(spec, cfg.seed, c.device)
        torch.manual_seed(0)
        shape = {"num_classes": data.num_classes, "in_channels": data.in_channels}
        model = build_model(spec.model_name, image_size=spec.data.image_size, **shape)
        model = model.to(c.device)
        layout = memory_format_for(model, c.memory_format)
        if layout is not None:
            model.to(memory_format=layout)
        optimizer = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum,
                                    weight_decay=c.weight_decay)  # fmt: skip
        model.train()
        if c.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(c.epochs):
            order = torch.randperm(len(data.y_train))
            for start in range(0, len(order), c.batch_size):
                idx = order[start : start + c.batch_size]
                x = data.x_train[idx]
                x = x if layout is None or x.dim() != 4 else x.contiguous(memory_format=layout)
                optimizer.zero_grad()
                F.cross_entropy(model(x), data.y_train[idx]).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
                optimizer.step()
        if c.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds += time.perf_counter() - started
        samples += len(data.y_train) * c.epochs
    return samples / seconds


def measure(spec: dict) -> dict:
    """`child` in a fresh process; adds its peak resident memory (wait4's rusage, Linux KiB)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    out = Path(spec["out"]) / "result.json"
    command = [
        sys.executable,
        "-m",
        "experiments.benchmark",
        "--child",
        f.name,
        "--result",
        str(out),
    ]
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    os.unlink(f.name)
    if process.returncode != 0:
        return {"error": f"exit status {process.returncode}"}
    result = json.loads(out.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    return result


def flower_run(args: argparse.Namespace, case: str, threads: int, out: Path) -> dict:
    """The same configuration through `flwr run` (Ray), via the experiment runner."""
    from experiments.runner import Runtime, run_sweep
    from server_app.outputs import read_metrics

    rc = run_config(args, case, "loop", "cpu")
    fixed = {"experiment", "method", "seed"}
    sweep = {
        "name": "benchmark_flower",
        "methods": [args.method],
        "experiments": ["default"],
        "seeds": [args.seed],
        "overrides": {k: v for k, v in rc.items() if k not in fixed and k != "engine"},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "flower_sweep.yaml"
    path.write_text(json.dumps(sweep))
    shutil.rmtree(out / "flower", ignore_errors=True)  # else a rerun finds its run finished
    started = time.perf_counter()
    outcomes = run_sweep(path, out / "flower", runtime=Runtime("flower", threads), progress=False)
    total = time.perf_counter() - started
    if outcomes[0].status != "ok":
        return {"error": outcomes[0].error[-300:]}
    return summary(read_metrics(out / "flower" / outcomes[0].run / "metrics.jsonl"), total)


def summary(rows: list[dict], total_seconds: float) -> dict:
    """What one run's metrics say about its speed and result (round 0 trains nothing)."""
    trained = [r for r in rows if r["round"] > 0]
    return {
        "seconds_per_round": statistics.fmean(r["seconds"] for r in trained),
        "server_seconds_per_client_update": statistics.fmean(
            r["server_seconds_per_client_update"] for r in trained
        ),
        "final_accuracy": rows[-1]["accuracy"],
        "total_seconds": total_seconds,
        "round_seconds": [r["seconds"] for r in trained],
    }


# ------------------------------------------------------------------ report
TIMINGS = (
    "seconds_per_round",
    "client_samples_per_second",
    "bare_torch_samples_per_second",
    "server_seconds_per_client_update",
    "total_seconds",
    "peak_rss_mb",
    "peak_cuda_mb",
)


def aggregate(runs: list[dict]) -> dict:
    """The median of each timing over the repeats; every repeat's s/round and accuracy are
    kept, and a repeat that reached another accuracy is reported (runs are seeded)."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return {"error": failed[0]["error"]}
    row = {key: statistics.median(r[key] for r in runs) for key in TIMINGS if key in runs[0]}
    row["final_accuracy"] = runs[0]["final_accuracy"]
    row["repeats"] = [
        {"seconds_per_round": r["seconds_per_round"], "final_accuracy": r["final_accuracy"]}
        for r in runs
    ]
    row["round_seconds"] = [r["round_seconds"] for r in runs]
    accuracies = {r["final_accuracy"] for r in runs}
    if len(accuracies) > 1:
        row["error"] = f"repeats reached different accuracies {sorted(accuracies)}"
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| case | engine | device | threads per client | s/round (range) | client-samples/s | "
        "bare PyTorch samples/s | of bare | server s/client update | peak memory MB "
        "| final accuracy | speed-up vs loop |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    loop_seconds = {
        (r["case"], r["device"], r["threads"]): r["seconds_per_round"]
        for r in rows
        if r["engine"] == "loop" and "seconds_per_round" in r
    }
    for r in rows:
        head = f"| {r['case']} | {r['engine']} | {r['device']} | {r['threads']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} |")
            continue
        memory = r.get("peak_cuda_mb", r.get("peak_rss_mb"))
        base = loop_seconds.get((r["case"], r["device"], r["threads"]))
        speedup = f"{base / r['seconds_per_round']:.2f}x" if base else "-"
        samples = r.get("client_samples_per_second")
        spread = [x["seconds_per_round"] for x in r.get("repeats", [])]
        seconds = f"{r['seconds_per_round']:.2f}"
        if len(spread) > 1:
            seconds += f" ({min(spread):.2f}-{max(spread):.2f})"
        bare = r.get("bare_torch_samples_per_second")
        cells = [
            seconds,
            "-" if samples is None else f"{samples:.0f}",
            "-" if bare is None else f"{bare:.0f}",
            "-" if bare is None or samples is None else f"{samples / bare:.2f}",
            f"{r['server_seconds_per_client_update']:.3f}",
            "-" if memory is None else f"{memory:.0f}",
            f"{r['final_accuracy']:.4f}",
            speedup,
        ]
        lines.append(f"{head} " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what a child process would only fail on, minutes later, as "exit status 1"."""
    unknown = sorted(set(args.cases.split(",")) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {unknown}; valid: {sorted(CASES)}")
    if set(args.engines.split(",")) - {"loop", "batched"}:
        parser.error(f"--engines {args.engines!r}: loop and/or batched")
    threads = args.threads.split(",")
    if not all(t.isdigit() and int(t) >= 1 for t in threads):
        parser.error(f"--threads {args.threads!r}: positive integers separated by commas")
    for name in ("clients", "rounds", "epochs", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="imagefolder:../shared/data/cifar10")
    parser.add_argument("--cases", default="lenet,five", help=f"from {sorted(CASES)}")
    parser.add_argument("--engines", default="loop,batched")
    parser.add_argument("--devices", default="cpu", help="e.g. cpu,cuda")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--method", default="mh_pfedhn")
    parser.add_argument(
        "--schedule",
        default="parallel_sequential",
        help="hypernetwork.schedule: a parallel one, whose rounds the batched engine trains "
        "together (one_by_one trains one client at a time on every engine)",
    )
    parser.add_argument("--seed", type=int, default=0)
    cores = os.cpu_count() or 1
    parser.add_argument(
        "--threads",
        default=",".join(dict.fromkeys(["1", str(cores)])),
        help="torch threads per client, one set of rows each (the batched engine on the CPU "
        "then trains cores/threads clients at once, as Ray would); default 1 and all cores",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each row, interleaved; median reported"
    )
    parser.add_argument("--flower", action="store_true", help="add flwr run for the first case")
    add_set_option(parser)
    parser.add_argument("--out", default="outputs/benchmark")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        Path(args.result).write_text(json.dumps(child(spec)))
        return 0
    _check(parser, args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Repeats run interleaved (loop, batched, loop, batched, ...) so that a slow spell on a
    # shared machine falls on every engine alike; rows report the median.
    runs: dict[tuple[str, str, str, int], list[dict]] = {}
    thread_counts = [int(t) for t in args.threads.split(",")]
    for repeat in range(args.repeats):
        for case in args.cases.split(","):
            for threads in thread_counts:
                for device in args.devices.split(","):
                    for engine in args.engines.split(","):
                        label = f"{case}-{engine}-{device}-{threads}t"
                        spec = {
                            "run_config": run_config(args, case, engine, device),
                            "threads": threads,
                            "out": str(out / label / f"repeat{repeat}"),
                        }
                        print(f"[benchmark] {label} ({repeat + 1}/{args.repeats}) ...", flush=True)
                        result = measure(spec)
                        runs.setdefault((case, engine, device, threads), []).append(result)
                        print(f"[benchmark] {label}: {json.dumps(result)}", flush=True)
                if args.flower and case == args.cases.split(",")[0]:
                    label = f"{case}-flower-cpu-{threads}t"
                    print(f"[benchmark] {label} ({repeat + 1}/{args.repeats}) ...", flush=True)
                    result = flower_run(args, case, threads, out / f"flower-{threads}t-{repeat}")
                    runs.setdefault((case, "flower (Ray)", "cpu", threads), []).append(result)
                    print(f"[benchmark] {label}: {json.dumps(result)}", flush=True)
    rows = [
        {"case": case, "engine": engine, "device": device, "threads": threads, **aggregate(res)}
        for (case, engine, device, threads), res in runs.items()
    ]
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("child", "result")},
              "cpu_count": os.cpu_count(), "rows": rows}  # fmt: skip
    (out / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "benchmark.md").write_text(markdown(rows))
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
