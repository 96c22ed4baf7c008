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
