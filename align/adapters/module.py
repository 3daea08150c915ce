"""The interface every adapter method implements for one wrapped layer."""

from __future__ import annotations

import torch
from torch import nn

from .errors import AdapterError


class AdapterModule(nn.Module):
    """One adapter's state on one base layer.

    ``forward(x, base_layer)`` returns the layer's full output with the adapter applied (the module calls the base
    itself, so methods that rescale inputs or reuse the base output can). ``peft_state_dict`` maps PEFT key
    suffixes (e.g. ``lora_A.weight``) to tensors; ``load_peft_state_dict`` is its inverse. Methods that cannot be
    folded into the weight leave ``merge_into``/``unmerge_from`` raising.
    """

    @classmethod
    def build(cls, config, base_layer: nn.Module, dtype: torch.dtype) -> AdapterModule:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def merge_into(self, base_layer: nn.Module) -> None:
        raise AdapterError(f"{type(self).__name__} cannot be merged into the base weights")

    def unmerge_from(self, base_layer: nn.Module) -> None:
        raise AdapterError(f"{type(self).__name__} cannot be unmerged")

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Copy tensors in (cast to this adapter's dtype). ``where`` names the layer for error messages."""
        own = self.peft_state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise AdapterError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")
        with torch.no_grad():
            for key, target in own.items():
                source = tensors[key]
                if source.shape != target.shape:
                    raise AdapterError(
                        f"{where}.{key}: saved shape {tuple(source.shape)} != expected {tuple(target.shape)} "
                        "(different rank or a different base?)"
                    )
                target.copy_(source.to(device=target.device, dtype=target.dtype))
