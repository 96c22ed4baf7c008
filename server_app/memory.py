"""Where the server's learned state lives and how much of it may exist: the device, and the
memory budget a registration is checked against before anything is allocated."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

BYTES_PER_WEIGHT = 16  # a float32 weight, its gradient and Adam's two moments


def resolve_device(requested: str) -> torch.device:
    """'auto' picks CUDA when present; an unavailable CUDA request falls back to CPU loudly."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("device %r requested but CUDA is not available: using the CPU", requested)
        return torch.device("cpu")
    return device


def memory_budget_bytes(setting: float | str, device: torch.device) -> int:
    """server.memory_budget_gb in bytes; "auto": 90% of the GPU, or half the machine's RAM."""
    if setting != "auto":
        return int(float(setting) * 1e9)
    if device.type == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    return int(0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def fused_adam(device: torch.device) -> bool | None:
    """PyTorch's fused Adam on the devices it has kernels for here, else its default: one
    kernel per step instead of ~10 elementwise passes over a head of up to hundreds of
    millions of weights (6x faster on the CPU, the same arithmetic to 1 ulp)."""
    return True if device.type in ("cpu", "cuda") else None
