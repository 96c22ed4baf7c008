"""Every federated method of this project, declared once: the registry.

A method is a Strategy on the server (`server_app/methods/<name>.py`), a client side (the
shared `client_app.method:ClientMethod`, which trains the vector it receives, or its own
class in `client_app/methods/<name>.py`), optionally a settings model (a pydantic model in
either module), and one `Method` entry below. The config accepts exactly these names, the
ServerApp builds the Strategy, the ClientApp the client side, and the configuration checks the
method's settings; nothing else names a method (docs/adding-a-method.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import Any

VECTOR_CLIENT = "client_app.method:ClientMethod"


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    paper: str  # where it comes from
    server: str  # "module:Class" of its Strategy
    client: str = VECTOR_CLIENT  # "module:Class" of its client side
    settings: str | None = None  # "module:Class" of its settings (a pydantic model)
    heterogeneous: bool = True  # clients may have different architectures
    sends: str = "Δθ, the change of its generated vector"  # besides its key and K
    models_note: str = ""  # how heterogeneous clients are served, if it says more
    novel_clients: bool = False  # has the generalization phase (paper 4.4)
    schedules: bool = False  # follows hypernetwork.schedule (else every round is parallel)

    def strategy_class(self) -> type:
        return _load(self.server)

    def client_class(self) -> type:
        return _load(self.client)

    def settings_class(self) -> type | None:
        return None if self.settings is None else _load(self.settings)


@cache
def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


_HN = "server_app.methods"
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "mh_pfedhn",
            "multi-head hypernetwork, one embedding set per client (Algorithm 1)",
            "MH-pFedHN paper, section 3.2",
            f"{_HN}.mh_pfedhn:MHpFedHN",
            novel_clients=True,
            schedules=True,
        ),
        Method(
            "mh_pfedhngd",
            "MH-pFedHN plus a public global model, distilled into the clients (Algorithm 2)",
            "MH-pFedHN paper, section 3.3",
            f"{_HN}.mh_pfedhngd:MHpFedHNGD",
            "client_app.methods.mh_pfedhngd:GlobalModelClient",
            f"{_HN}.mh_pfedhngd:GlobalModelSettings",
            novel_clients=True,
            schedules=True,
            sends="Δθ, the global model's change Δw_g, and K_g",
        ),
        Method(
            "mh_pfedhngd_no_distill",
            "MH-pFedHNGD without distillation (the paper's ablation MH-pFedHNG)",
            "MH-pFedHN paper, section 4.5",
            f"{_HN}.mh_pfedhngd:MHpFedHNGDNoDistill",
            "client_app.methods.mh_pfedhngd:GlobalModelClient",
            f"{_HN}.mh_pfedhngd:GlobalModelSettings",
            novel_clients=True,
            schedules=True,
            sends="as `mh_pfedhngd`",
        ),
        Method(
            "local",
            "baseline: every client trains its own model; no parameters travel",
            "MH-pFedHN paper, section 4.1",
            f"{_HN}.local:Local",
            "client_app.methods.local:LocalClient",
            sends="metrics only",
        ),
        Method(
            "fedavg",
            "baseline: one global model, w <- w - sum_i (m_i/M) delta_i",
            "McMahan et al., AISTATS 2017",
            f"{_HN}.fedavg:FedAvg",
            "client_app.methods.fedavg:InitialVectorClient",
            heterogeneous=False,
            sends="Δw, and its initial vector once",
        ),
        Method(
            "fedavgm",
            "FedAvg with server momentum: v <- beta v + mean delta, w <- w - v",
            "Hsu et al., arXiv 1909.06335, 2019",
            f"{_HN}.fedavgm:FedAvgM",
            "client_app.methods.fedavg:InitialVectorClient",
            f"{_HN}.fedavgm:FedAvgMSettings",
            heterogeneous=False,
            sends="as `fedavg`",
        ),
        Method(
            "fedprox",
            "FedAvg whose clients add a proximal term mu/2 ||w - w_received||^2",
            "Li et al., MLSys 2020",
            f"{_HN}.fedavg:FedAvg",
            "client_app.methods.fedprox:FedProxClient",
            "client_app.methods.fedprox:FedProxSettings",
            heterogeneous=False,
            sends="as `fedavg`",
        ),
        Method(
            "pfedhn",
            "baseline: pFedHN, one linear head per parameter tensor, a set per architecture",
            "Shamsian et al., ICML 2021",
            f"{_HN}.pfedhn:PFedHN",
            "client_app.methods.pfedhn:TensorSizesClient",
            schedules=True,
            sends="Δθ, and its tensor sizes once",
            models_note="a set of heads per architecture",
        ),
        Method(
            "pfedlhn",
            "baseline: pFedLHN, layer-wise client embeddings over a shared bank, a head per tensor",
            "Zhu, Liu and Sun, Neural Processing Letters 55, 2023",
            f"{_HN}.pfedlhn:PFedLHN",
            "client_app.methods.pfedhn:TensorSizesClient",
            f"{_HN}.pfedlhn:PFedLHNSettings",
            schedules=True,
            sends="Δθ, and its tensor sizes once",
            models_note="a set of heads per architecture",
        ),
        Method(
            "fedgh",
            "baseline: private extractors, one shared header trained on class prototypes",
            "Yi et al., ACM MM 2023",
            f"{_HN}.fedgh:FedGH",
            "client_app.methods.fedgh:GeneralizedHeaderClient",
            f"{_HN}.fedgh:FedGHSettings",
            sends="the mean representation of each class it holds (prototypes)",
            models_note="a shared last layer",
        ),
        Method(
            "pfedla",
            "baseline: per-client hypernetworks weigh every client's layers into its model",
            "Ma et al., CVPR 2022",
            f"{_HN}.pfedla:PFedLA",
            "client_app.methods.pfedla:LayerWiseAggregationClient",
            f"{_HN}.pfedla:PFedLASettings",
            heterogeneous=False,
            sends="Δθ, its tensor sizes and its initial vector once",
            schedules=True,
        ),
        Method(
            "fedakt",
            "baseline (our reconstruction): a shared adapter beside each private model, "
            "mutual feature distillation, the adapters averaged",
            "Liu et al., J. Systems Architecture 159, 2025",
            f"{_HN}.fedavg:FedAvg",
            "client_app.methods.fedakt:AdapterClient",
            "client_app.methods.fedakt:FedAKTSettings",
            sends="Δ of the shared adapter, and the adapter's initial vector once",
            models_note="a shared adapter of the representation's width",
        ),
        Method(
            "pefll",
            "baseline: an embedding network describes a client's data, a hypernetwork maps "
            "the description to its model",
            "Scott, Zakerinia and Lampert, ICLR 2024",
            f"{_HN}.pefll:PeFLL",
            "client_app.methods.pefll:DescriptorClient",
            f"{_HN}.pefll:PeFLLSettings",
            heterogeneous=False,
            sends="Δθ, its data descriptor and the embedding network's gradient each round",
        ),
    )
}

#: Former method names, with what to use instead.
RENAMED_METHODS = {"mh_pfedhng": "mh_pfedhngd_no_distill"}


def get_method(name: str) -> Method:
    if name in RENAMED_METHODS:
        raise ValueError(f"method {name!r} is now called {RENAMED_METHODS[name]!r}")
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None
