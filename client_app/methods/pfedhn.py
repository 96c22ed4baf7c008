"""pFedHN's client: it also reports the sizes of its parameter tensors, one head each on the
server (Shamsian et al., 2021)."""

from __future__ import annotations

from typing import Any

from torch import nn

from client_app.method import ClientMethod
from client_app.session import Session
from common import protocol


class TensorSizesClient(ClientMethod):
    reports = (protocol.Sizes(protocol.TENSOR_SIZES),)

    def report(self, session: Session, model: nn.Module) -> dict[str, Any]:
        return {protocol.TENSOR_SIZES: [p.numel() for p in model.parameters() if p.requires_grad]}
