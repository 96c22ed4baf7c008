"""The data settings of a run on the `tiny_npz` fixture: IID partitions, a cache of its own."""

from __future__ import annotations

from pathlib import Path


def tiny_data(tiny_npz: Path, tmp_path: Path, clients: int) -> dict:
    return {
        "data.source": f"npz:{tiny_npz}",
        "data.cache_dir": str(tmp_path / "cache"),
        "data.num_clients": clients,
        "data.partitioner": "iid",
        "data.classes_per_client": 2,
    }


def mnist_accuracies(mnist_npz: Path, method: str, rounds: int, **settings) -> list[float]:
    """Pooled accuracy per round of a short in-process run on 10% of MNIST, 4 clients (the
    learning tests of the baselines; `settings` are run-config overrides)."""
    import tempfile

    from common.config import resolve_config
    from simulation.run import run_inprocess

    overrides = {"method": method, "rounds": rounds, "data.source": f"npz:{mnist_npz}",
                 "data.fraction": 0.1, "data.num_clients": 4, "clients.models": "lenet,mlp",
                 "client.epochs": 1, "server.min_nodes": 1, "server.checkpoint_every": 0,
                 "server.output_root": tempfile.mkdtemp(), **settings}  # fmt: skip
    strategy = run_inprocess(resolve_config("default", overrides), overrides)
    return [row["accuracy"] for row in strategy.history]
