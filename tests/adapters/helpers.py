"""Plain helpers shared by the adapter-method tests: a one-layer model for hand arithmetic, seeded nudges that make
an adapter non-trivial, and logits under an adapter."""

from __future__ import annotations

import torch
from torch import nn

from align.adapters import AdapterModel

MIN_EFFECT = 1e-2  # a nudged adapter moves some logit by more than this
INTEROP_ATOL = 1e-5


class OneLinear(nn.Module):
    """A single Linear named ``proj``: small enough to work the math out by hand."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.proj.weight.copy_(weight)
            if bias is not None:
                self.proj.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def nudge(params, seed: int = 7, scale: float = 0.1) -> None:
    """Add seeded noise to every tensor, so an adapter that starts as the identity does something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen))


def logits(model: nn.Module, input_ids: torch.Tensor, name: str | None = None, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, AdapterModel):
            with model.use(name):
                return model(input_ids, **kwargs).logits
        return model(input_ids, **kwargs).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def with_adapter(factory, config, name: str = "a", seed: int = 0, nudge_seed: int | None = 7) -> AdapterModel:
    """``factory(seed=seed)`` in eval mode with adapter ``name`` (nudged unless ``nudge_seed`` is None)."""
    model = AdapterModel(factory(seed=seed)).eval()
    model.add_adapter(name, config)
    if nudge_seed is not None:
        nudge(model.adapter_parameters(name), nudge_seed)
    return model
