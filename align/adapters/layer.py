"""The wrapper that replaces each adapted layer: the untouched base layer plus named adapters.

Which adapter is active lives in one ``AdapterState`` object shared by every wrapper of a model, so switching the
active adapter is a single attribute write, not a walk over the model.
"""

from __future__ import annotations

import torch
from torch import nn

from .module import AdapterModule


class AdapterState:
    """Model-wide switch: the active adapter's name, or None for the bare base."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active: str | None = None


class AdaptedLayer(nn.Module):
    """``base_layer`` (frozen, shared) and ``adapters`` (name -> AdapterModule). Only the active adapter runs."""

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self._state = state
        self.merged: str | None = None  # name of the adapter folded into base_layer's weight, if any

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._state.active
        if name is None or name == self.merged or name not in self.adapters:
            return self.base_layer(x, *args, **kwargs)
        return self.adapters[name](x, self.base_layer)

    def add(self, name: str, module: AdapterModule) -> None:
        self.adapters[name] = module.train(self.base_layer.training)  # eval base: no dropout in a new adapter

    # Attribute pass-through so model code that inspects its projections (dtype checks, shapes) keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def in_features(self) -> int:
        from .base_layers import features

        return features(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        from .base_layers import features

        return features(self.base_layer)[1]

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, merged={self.merged}"
