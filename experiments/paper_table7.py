"""The paper's Table 7 (appendix C.2): CIFAR-10 test accuracy (%) of every method, 10, 50 and
100 clients, homogeneous LeNet and the heterogeneous five-model set, non-IID_1 and non-IID_2.

These are best-round figures averaged over three runs (docs/concepts/metrics.md). The report
puts them beside each run's own figures and uses their order for the paired comparisons
(experiments/orderings.py)."""

from __future__ import annotations

import math
from typing import Any

METHODS = (
    "local", "fedavg", "pfedhn", "pfedla", "fedgh", "pfedlhn", "pefll", "fedakt",
    "mh_pfedhn", "mh_pfedhngd",
)  # fmt: skip
# columns: (models, partitioner, clients), in the paper's order
COLUMNS = [
    (models, partitioner, clients)
    for models in ("homogeneous", "heterogeneous")
    for partitioner in ("noniid1", "noniid2")
    for clients in (10, 50, 100)
]
_ROWS = {
    "local": "92.71 89.38 87.87 83.04 82.77 79.53 93.23 84.98 80.26 81.97 80.58 75.09",
    "fedavg": "50.15 51.39 58.28 64.23 64.77 61.65 54.59 65.51 57.28 73.61 56.75 51.65",
    "pfedhn": "92.60 91.66 90.87 82.67 85.49 81.78 92.83 88.11 87.00 81.12 80.96 77.75",
    "pfedla": "85.12 83.86 81.71 77.49 84.06 77.14 93.26 73.27 65.38 77.67 81.00 75.55",
    "fedgh": "92.90 88.24 85.39 84.19 73.55 72.82 92.56 86.04 83.36 83.01 70.39 70.26",
    "pfedlhn": "94.16 91.09 90.71 82.49 86.10 85.48 93.67 89.33 87.26 83.79 84.21 79.82",
    "pefll": "89.21 86.62 86.08 75.59 78.25 78.76 92.21 89.09 88.20 80.85 82.49 80.65",
    "fedakt": "93.46 91.14 90.31 83.88 85.96 82.58 93.58 88.59 85.62 82.82 83.05 78.69",
    "mh_pfedhn": "94.24 91.69 91.23 83.72 87.13 85.79 93.98 89.74 88.53 83.87 84.11 80.53",
    "mh_pfedhngd": "93.56 91.75 92.12 82.92 87.50 86.25 93.81 90.26 88.73 83.83 85.52 80.88",
}
FIVE_MODELS = ("lenet", "vgg8", "resnet10", "resnet12", "resnet18")
PARTITIONERS = tuple(dict.fromkeys(partitioner for _, partitioner, _ in COLUMNS))
CLIENTS = tuple(dict.fromkeys(clients for _, _, clients in COLUMNS))
TABLE7: dict[tuple[str, str, int], dict[str, float]] = {
    column: {method: float(_ROWS[method].split()[i]) / 100 for method in METHODS}
    for i, column in enumerate(COLUMNS)
}


def column_of(config: dict[str, Any]) -> tuple[str, str, int] | None:
    """The Table 7 column a run's resolved config reproduces: all of CIFAR-10 split 75/25 per
    client, one LeNet for every client (homogeneous) or the five-model set (heterogeneous),
    non-IID_1 with 2 classes per client or non-IID_2 with beta 0.1 (docs/concepts/data.md), 10,
    50 or 100 clients and no novel clients; None for anything else (`mismatches` says why)."""
    data = config.get("data") or {}
    column = (_kind(config), data.get("partitioner"), data.get("num_clients"))
    return column if not mismatches(config) and column in TABLE7 else None  # type: ignore[return-value]


def _kind(config: dict[str, Any]) -> str | None:
    models = tuple((config.get("clients") or {}).get("models") or [])
    return {("lenet",): "homogeneous", FIVE_MODELS: "heterogeneous"}.get(models)


def _listed(values: tuple) -> str:
    return ", ".join(map(str, values))


def mismatches(config: dict[str, Any]) -> list[str]:
    """What keeps a run's resolved config out of every column of Table 7, one phrase each
    (`data.fraction is 0.05, not 1`); none for a run in one of its settings."""
    data = config.get("data") or {}
    source = str(data.get("source", "")).lower()
    dataset = source.rsplit(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1]  # cifar10, a folder
    checks = [
        (dataset == "cifar10", f"the data is {dataset or 'unknown'}, not CIFAR-10"),
        (data.get("fraction", 1.0) in (1.0, None),
         f"data.fraction is {data.get('fraction')}, not 1"),
        (data.get("train_fraction", 0.75) == 0.75,
         f"data.train_fraction is {data.get('train_fraction')}, not 0.75"),
        (data.get("classes_per_client", "auto") in ("auto", 2),
         f"data.classes_per_client is {data.get('classes_per_client')}, not 2"),
        (data.get("dirichlet_beta", "auto") in ("auto", 0.1),
         f"data.dirichlet_beta is {data.get('dirichlet_beta')}, not 0.1"),
        (not (config.get("generalization") or {}).get("novel_clients"), "it has novel clients"),
        (_kind(config) is not None,
         f"clients.models is neither one LeNet nor the five-model set ({', '.join(FIVE_MODELS)})"),
        (data.get("partitioner") in PARTITIONERS,
         f"data.partitioner is {data.get('partitioner')}, not {' or '.join(PARTITIONERS)}"),
        (data.get("num_clients") in CLIENTS,
         f"data.num_clients is {data.get('num_clients')}, not one of {_listed(CLIENTS)}"),
    ]  # fmt: skip
    return [reason for ok, reason in checks if not ok]


def paper_accuracy(config: dict[str, Any], method: str) -> float:
    """The paper's Table 7 figure (a fraction) for this run's setting and method; nan if none."""
    column = column_of(config)
    return TABLE7[column].get(method, math.nan) if column else math.nan
