"""FedGH's client (Yi et al., "FedGH: Heterogeneous Federated Learning with Generalized Global
Header", ACM MM 2023; docs/design/baselines.md, section 2). Its model is a private feature
extractor (everything but the last Linear, kept on the client between rounds, never sent)
followed by the shared header, the last Linear(d, C), which is the only part that travels.
Each round it trains the whole model with the received header, then sends, instead of a
delta, the mean representation (the header's input) of each class it holds: prototypes,
computed in eval mode over its training split. Any zoo model whose last layer is a Linear
works; clients differ in architecture but share d and C (64 and the class count in the zoo).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from client_app.method import ClientMethod, TrainJob
from client_app.session import Layout, Session
from client_app.training import memory_format_for
from common import protocol

REP_DIM = "rep-dim"  # d: the width of the representation the header reads
PROTO_CLASSES = "proto-classes"  # the classes of the client's training split, ascending
PROTO_VALUES = "proto-values"  # their mean representations, (n, d)


def header_name(model: nn.Module) -> str:
    """The model's last Linear layer: the header FedGH shares."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise ValueError(f"FedGH needs a model whose header is a Linear layer; "
                         f"{type(model).__name__} has none")  # fmt: skip
    return linear[-1]


@torch.no_grad()
def prototypes(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, memory_format: str = "contiguous"
) -> tuple[np.ndarray, np.ndarray]:
    """(classes ascending, their mean representations): the input of the header, averaged
    per class over the given split, in eval mode."""
    header = model.get_submodule(header_name(model))
    captured: list[torch.Tensor] = []
    hook = header.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))
    layout = memory_format_for(model, memory_format)
    model.eval()
    try:
        for start in range(0, len(y), 512):
            xb = x[start : start + 512]
            model(xb if layout is None or xb.dim() != 4 else xb.contiguous(memory_format=layout))
    finally:
        hook.remove()
    features = torch.cat(captured).double() if captured else torch.zeros(0, header.in_features)
    classes = torch.unique(y)
    means = torch.stack([features[y == c].mean(0) for c in classes]) if len(classes) else features
    return classes.cpu().numpy().astype(np.int32), means.float().cpu().numpy()


class GeneralizedHeaderClient(ClientMethod):
    reports = (protocol.Count(REP_DIM, maximum=65_536),)
    returns = (protocol.Indices(PROTO_CLASSES), protocol.Floats(PROTO_VALUES))

    def layout(self, session: Session, model: nn.Module) -> Layout:
        """The header travels; the extractor stays here (saved as local layers)."""
        name = header_name(model)
        shared = [n for n, p in model.named_parameters() if n.startswith(f"{name}.")]
        local = [n for n, p in model.named_parameters() if p.requires_grad and n not in shared]
        return Layout(shared, local, [])

    def report(self, session: Session, model: nn.Module) -> dict[str, Any]:
        return {REP_DIM: model.get_submodule(header_name(model)).in_features}

    def answer_train(self, job: TrainJob, loss: float) -> RecordDict:
        """No delta: the class prototypes of the trained extractor; the extractor is kept."""
        session = job.session
        session.save_model_state(job.model, job.layout)
        data = session.data
        classes, means = prototypes(job.model, data.x_train, data.y_train,
                                    session.cfg.client.memory_format)  # fmt: skip
        extras = {PROTO_CLASSES: classes, PROTO_VALUES: means}
        return protocol.train_reply(None, len(data.y_train), loss, evaluation=job.evaluation,
                                    extras=extras)  # fmt: skip
