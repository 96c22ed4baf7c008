"""PeFLL's client (Scott, Zakerinia and Lampert, "PeFLL: Personalized Federated Learning by
Learning to Learn", ICLR 2024; code pefllauthors/PeFLL; docs/design/baselines.md, section 4).

The server keeps an embedding network E (which it sends) and a hypernetwork h (which it keeps).
Besides MH-pFedHN's train and evaluate, a client answers two message types of its own:
- `train.descriptor`: its descriptor v = the mean of E(x, y) over its data (the first
  `embed-batches` batches of a seeded order when training, all its training data for
  evaluation), the images with the one-hot label as extra channels;
- `train.embedgrad`: given g = d<theta, delta>/dv from the server, the gradient (dv/dE)^T g of
  the embedding network, recomputed on exactly the same samples.
It trains theta = h(v) as any vector client does. Its data never leave it; the descriptor and
the embedding gradient do (an inversion surface PeFLL has by design: docs/threat-model.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Message, RecordDict
from torch import nn

from client_app.methods.pfedhn import TensorSizesClient
from client_app.session import Session
from common import protocol
from common.param_vector import vector_to_model

TRAIN_DESCRIPTOR = "train.descriptor"
TRAIN_EMBEDGRAD = "train.embedgrad"
EMBED_NET = "embed-net"  # server -> client: E's parameters
DESCRIPTOR = "descriptor"  # client -> server: v (raw)
DESCRIPTOR_GRAD = "descriptor-grad"  # server -> client: d<theta, delta>/dv
EMBED_GRAD = "embed-grad"  # client -> server: (dv/dE)^T descriptor-grad
SCOPE, EMBED_BATCHES = "scope", "embed-batches"  # config: "batches" | "full", how many
DATA_SHAPE = ("in-channels", "num-classes", "image-size")  # what E's shape depends on
MAX_DESCRIPTOR = 4096


class DescriptorNet(nn.Sequential):
    """PeFLL's CNNEmbed: Conv5(c + C, 16) ReLU MaxPool2, Conv5(16, 32) ReLU MaxPool2,
    FC(., 120) ReLU, FC(120, 84) ReLU, FC(84, d)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, dim: int) -> None:
        side = ((image_size - 4) // 2 - 4) // 2
        super().__init__(
            nn.Conv2d(in_channels + num_classes, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * side * side, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, dim),
        )  # fmt: skip
        self.num_classes = num_classes

    def embed(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample embeddings of images with their one-hot labels as extra channels."""
        onehot = F.one_hot(y, self.num_classes).to(x.dtype)[:, :, None, None]
        labels = onehot.expand(-1, -1, x.shape[2], x.shape[3])
        return self(torch.cat([x, labels], dim=1))


def descriptor_samples(session: Session, msg: Message) -> torch.Tensor:
    """Which training samples make the descriptor: a seeded choice of `embed-batches`
    batches for a train round (the same for both messages of the round), or all of them."""
    config = protocol.read_config(msg)
    n = len(session.data.y_train)
    if config[SCOPE] == "full":
        return torch.arange(n)
    order = torch.randperm(n, generator=session.generator("descriptor", protocol.read_round(msg)))
    return order[: int(config[EMBED_BATCHES]) * session.cfg.client.batch_size]


def embedding_net(session: Session, msg: Message, dim: int) -> DescriptorNet:
    data = session.data
    net = DescriptorNet(data.in_channels, data.num_classes, session.spec.data.image_size, dim)
    vector_to_model(net, msg.content["arrays"][EMBED_NET].numpy())
    return net


class DescriptorClient(TensorSizesClient):
    reports = TensorSizesClient.reports + tuple(protocol.Count(n) for n in DATA_SHAPE)
    returns = ()
    actions = (TRAIN_DESCRIPTOR, TRAIN_EMBEDGRAD)

    def report(self, session: Session, model: nn.Module) -> dict[str, Any]:
        data = session.data
        shape = (data.in_channels, data.num_classes, session.spec.data.image_size)
        return {**super().report(session, model), **dict(zip(DATA_SHAPE, shape, strict=True))}

    def handle_action(self, session: Session, msg: Message) -> RecordDict:
        kind = msg.metadata.message_type
        if kind not in self.actions:
            return super().handle_action(session, msg)
        dim = int(protocol.read_config(msg)["descriptor-dim"])
        picked = descriptor_samples(session, msg)
        x, y = session.data.x_train[picked], session.data.y_train[picked]
        net = embedding_net(session, msg, dim).to(x.device)  # where the data is (client.device)
        if kind == TRAIN_DESCRIPTOR:
            with torch.no_grad():
                v = net.embed(x, y).mean(0)
            return protocol.fields_reply({DESCRIPTOR: v.cpu().numpy().astype(np.float32)})
        g = torch.from_numpy(msg.content["arrays"][DESCRIPTOR_GRAD].numpy()).to(x.device)
        net.embed(x, y).mean(0).backward(g)
        grads = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        return protocol.fields_reply({EMBED_GRAD: grads.cpu().numpy().astype(np.float32)})
