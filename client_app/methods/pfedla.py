"""pFedLA's client (Ma et al., CVPR 2022; docs/design/baselines.md, section 1): it trains the
layer-wise aggregated model the server mixes for it, as any vector client does, and reports
the sizes of its parameter tensors (the layers the server weighs) and, once, its seeded
initial parameters (every client's model starts from them on the server)."""

from __future__ import annotations

from typing import Any

from torch import nn

from client_app.methods.fedavg import InitialVectorClient
from client_app.methods.pfedhn import TensorSizesClient
from client_app.session import Session


class LayerWiseAggregationClient(TensorSizesClient, InitialVectorClient):
    reports = TensorSizesClient.reports + InitialVectorClient.reports

    def report(self, session: Session, model: nn.Module) -> dict[str, Any]:
        return {**TensorSizesClient.report(self, session, model),
                **InitialVectorClient.report(self, session, model)}  # fmt: skip
