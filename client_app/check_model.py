"""Check a site's model before it joins a run: does it build and fit the data, what K it will
report, and how many chunks (τ) the hypernetwork will generate it from.

    python -m client_app.check_model site_models:small_cnn --chunk-size 3072

The paper recommends τ = ceil(K / N) above the model's number of layers (section 3.2), so
that no chunk has to generate several layers. Only the client can check this: the server
learns K, never the layers. A model at or under the recommendation still runs; this says by
how much to lower the server's `hypernetwork.chunk_size` (N), which changes every client's τ.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

from torch import nn

from client_app.session import Layout, model_layout
from common.config import HypernetworkConfig
from common.models import build_model, check_fits_the_data
from common.param_vector import num_chunks, parse_layer_patterns, vector_size


@dataclass(frozen=True)
class ModelCheck:
    """What the server will see of a model (K and τ) and what only the client knows (layers)."""

    num_params: int  # K: the vector's length
    kept_local: int  # trainable parameters that never leave the client
    layers: int  # modules owning a parameter of the vector (BatchNorm included)
    chunk_size: int  # N

    @property
    def tau(self) -> int:
        """ceil(K / N), by the rule the server uses."""
        return num_chunks(self.num_params, self.chunk_size)

    @property
    def meets_recommendation(self) -> bool:
        return self.tau > self.layers

    @property
    def largest_chunk_size(self) -> int:
        """The largest N with ceil(K / N) above the layers; 0 if no N gives that."""
        return max(0, math.ceil(self.num_params / self.layers) - 1)


def check_model(model: nn.Module, layout: Layout, chunk_size: int) -> ModelCheck:
    shared = layout.shared or [n for n, p in model.named_parameters() if p.requires_grad]
    in_vector = set(shared)
    layers = sum(
        any(
            f"{prefix}.{n}".lstrip(".") in in_vector
            for n, _ in module.named_parameters(recurse=False)
        )
        for prefix, module in model.named_modules()
    )
    num_params = vector_size(model, shared)
    return ModelCheck(
        num_params=num_params,
        kept_local=vector_size(model, layout.local) if layout.local else 0,
        layers=layers,
        chunk_size=chunk_size,
    )


def describe(name: str, check: ModelCheck) -> list[str]:
    lines = [
        f"{name}: builds and maps the data's images to one logit per class",
        f"K = {check.num_params:,} parameters in the vector"
        + (f" ({check.kept_local:,} more kept local)" if check.kept_local else ""),
        f"layers with parameters in the vector: {check.layers}",
        f"τ = ceil(K / {check.chunk_size}) = {check.tau}",
    ]
    if check.meets_recommendation:
        lines.append(f"ok: τ {check.tau} is above the {check.layers} layers (paper section 3.2)")
    elif check.largest_chunk_size:
        lines.append(
            f"warning: τ {check.tau} is not above the {check.layers} layers, as the paper "
            "recommends (section 3.2); the model still runs. A server "
            f"`hypernetwork.chunk_size` of at most {check.largest_chunk_size:,} meets it "
            "(it changes every client's τ)"
        )
    else:
        lines.append(
            f"warning: K {check.num_params:,} is too small for τ above its {check.layers} "
            "layers at any chunk size; the model still runs"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client_app.check_model", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("model", help="a zoo name or an import path 'package.module:factory'")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    default_n = HypernetworkConfig().chunk_size
    parser.add_argument(
        "--chunk-size", type=int, default=default_n,
        help=f"the server's hypernetwork.chunk_size N (default {default_n})",
    )  # fmt: skip
    parser.add_argument("--local-layers", default="none", help="as the node config's")
    parser.add_argument("--frozen-layers", default="none", help="as the node config's")
    args = parser.parse_args(argv)
    for flag in ("num_classes", "in_channels", "image_size", "chunk_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    shape = {"num_classes": args.num_classes, "in_channels": args.in_channels,
             "image_size": args.image_size}  # fmt: skip
    try:
        model = build_model(args.model, **shape)
        check_fits_the_data(args.model, model, shape)  # a zoo model too (not at every build)
        layout = model_layout(model, parse_layer_patterns(args.local_layers),
                              parse_layer_patterns(args.frozen_layers))  # fmt: skip
    except (ImportError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(describe(args.model, check_model(model, layout, args.chunk_size))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
