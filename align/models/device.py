"""Where a model lives, and moving batches there. Collators and samplers build CPU tensors; every forward helper and
trainer moves its inputs to the model's device, so the same code trains on a CPU or a GPU."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (dicts, lists, tuples) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True) if obj.device != device else obj
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def resolve_device(setting: str = "auto") -> torch.device:
    """'auto': the first CUDA device when there is one, else the CPU; or 'cpu' / 'cuda' / 'cuda:N'."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device={setting!r}: no CUDA device is visible here (use auto or cpu)")
    return device
