"""Every federated method of this project, declared once.

The config accepts exactly these names, the ServerApp builds a method's server state and
Strategy from its entry, and the ClientApp reads from it what to report and what to train.
Adding a method: write its Strategy (and server state, if it needs a new one) in one module
under `server_app/methods/`, then add one `Method(...)` entry to `METHODS` below
(README, "Adding a method").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

from common import protocol

#: What a client may report besides its key and K (protocol.identity_reply).
REPORTABLE = (protocol.GLOBAL_NUM_PARAMS, protocol.TENSOR_SIZES, protocol.INITIAL)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    strategy: str  # "module:Class" of its Strategy
    state: str  # "module:Class" of its server state
    reports: tuple[str, ...] = ()  # entries of REPORTABLE the client adds to its query reply
    trains: Literal["received", "own"] = "received"  # the vector it receives, or its own model
    global_model: bool = False  # a public global model trained in a first phase (train.global)
    distills: bool = False  # phase-2 clients distill from the global model
    novel_clients: bool = False  # supports the generalization phase (paper 4.4)
    schedules: bool = False  # follows hypernetwork.schedule (else every round is parallel)

    def __post_init__(self) -> None:
        unknown = set(self.reports) - set(REPORTABLE)
        if unknown:
            raise ValueError(f"{self.name}: cannot report {sorted(unknown)}; see REPORTABLE")
        if self.distills and not self.global_model:
            raise ValueError(f"{self.name}: distillation needs a global model")

    def strategy_class(self) -> type:
        return _load(self.strategy)

    def state_class(self) -> type:
        return _load(self.state)


def _load(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


_HN_STATE = "server_app.hypernetwork_server:HypernetworkServer"
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "mh_pfedhn",
            "multi-head hypernetwork, one embedding set per client (paper Algorithm 1)",
            "server_app.methods.mh_pfedhn:MHpFedHN",
            _HN_STATE,
            novel_clients=True,
            schedules=True,
        ),
        Method(
            "mh_pfedhngd",
            "MH-pFedHN plus a public global model, distilled into the clients (Algorithm 2)",
            "server_app.methods.mh_pfedhngd:MHpFedHNGD",
            _HN_STATE,
            reports=(protocol.GLOBAL_NUM_PARAMS,),
            global_model=True,
            distills=True,
            novel_clients=True,
            schedules=True,
        ),
        Method(
            "mh_pfedhng",
            "MH-pFedHNGD without distillation (the paper's ablation)",
            "server_app.methods.mh_pfedhngd:MHpFedHNGD",
            _HN_STATE,
            reports=(protocol.GLOBAL_NUM_PARAMS,),
            global_model=True,
            novel_clients=True,
            schedules=True,
        ),
        Method(
            "local",
            "baseline: every client trains its own model; no parameters travel",
            "server_app.methods.local:Local",
            "server_app.methods.local:LocalServer",
            trains="own",
        ),
        Method(
            "fedavg",
            "baseline: one global model, w <- w - sum_i (m_i/M) delta_i (one architecture)",
            "server_app.methods.fedavg:FedAvg",
            "server_app.methods.fedavg:FedAvgServer",
            reports=(protocol.INITIAL,),
        ),
        Method(
            "pfedhn",
            "baseline: pFedHN, one linear head per parameter tensor, a set per architecture",
            "server_app.methods.pfedhn:PFedHN",
            "server_app.methods.pfedhn:PFedHNServer",
            reports=(protocol.TENSOR_SIZES,),
            schedules=True,
        ),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None
