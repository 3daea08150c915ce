"""Trainable-parameter accounting, in the format of PEFT's ``print_trainable_parameters``."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import base_layers as bl


@dataclass(frozen=True)
class ParameterReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def parameter_report(model: nn.Module) -> ParameterReport:
    """Count parameters; a quantized layer counts its logical in x out weights, not its packed storage."""
    trainable = total = 0
    for module in model.modules():
        quantized = bl.is_quantized(module)
        for key, param in module.named_parameters(recurse=False):
            n = param.numel()
            if quantized and key == "weight":
                d_in, d_out = bl.features(module)
                n = d_in * d_out
            total += n
            if param.requires_grad:
                trainable += n
    return ParameterReport(trainable, total)
