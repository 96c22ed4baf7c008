"""FedAvg's client: it trains the global vector like any other, and reports its seeded
initial parameters when it first registers (the server starts from them unless it was given
its own)."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from client_app.method import ClientMethod
from client_app.session import Session
from common import protocol
from common.param_vector import model_to_vector


class InitialVectorClient(ClientMethod):
    reports = (protocol.Floats(protocol.INITIAL, required=False),)  # not if the server has w_0

    def report(self, session: Session, model: nn.Module) -> dict[str, Any]:
        return {protocol.INITIAL: model_to_vector(model).numpy().astype(np.float32)}
