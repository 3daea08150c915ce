"""The interfaces adapter methods implement: ``AdapterModule`` for one wrapped layer (LoRA, IA³, AdaLoRA,
bottleneck adapters) and ``ModelAdapter`` for methods that act on the whole forward pass of the backbone instead of
on a layer (prompt tuning: the input embeddings; prefix tuning: the attention KV cache)."""

from __future__ import annotations

import torch
from torch import nn

from .errors import AdapterError


class AdapterModule(nn.Module):
    """One adapter's state on one base layer.

    ``build(config, base_layer, dtype, path)`` creates it; ``path`` is the layer's module path, for methods whose
    settings differ per layer (IA³'s feed-forward layers, AdaLoRA's saved ranks). ``forward(x, base_layer)``
    returns the layer's full output with the adapter applied (the module calls the base itself, so methods that
    rescale inputs or reuse the base output can). ``peft_state_dict`` maps PEFT key suffixes (e.g.
    ``lora_A.weight``) to tensors; ``load_peft_state_dict`` is its inverse. Methods that cannot be folded into the
    weight set ``merge_refusal`` to the reason, which ``AdapterModel.merge`` reports before touching any layer.
    """

    merge_refusal: str | None = None

    @classmethod
    def build(cls, config, base_layer: nn.Module, dtype: torch.dtype, path: str = "") -> AdapterModule:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def merge_into(self, base_layer: nn.Module) -> None:
        raise AdapterError(f"{type(self).__name__} cannot be merged into the base weights: {self.merge_refusal}")

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


class ModelAdapter(AdapterModule):
    """One adapter that acts on the backbone's forward pass as a whole (the transformers ``base_model``: the
    decoder stack without the LM head), not on a layer. ``AdapterModel`` holds one per adapter name and, while it
    is the active adapter, lets it rewrite the backbone's keyword arguments before the call (``prepare``) and the
    output after it (``finish``). ``build(config, model, dtype)`` receives the whole base model; ``self.config`` is
    the config with every model-derived field filled in (hidden size, layers...), the one that is saved.
    ``peft_state_dict`` keys are the full on-disk keys (PEFT's ``prompt_embeddings``), not layer suffixes.
    """

    config = None

    @classmethod
    def build(cls, config, model: nn.Module, dtype: torch.dtype, path: str = "") -> ModelAdapter:
        raise NotImplementedError

    def prepare(self, backbone: nn.Module, kwargs: dict) -> dict:  # pragma: no cover - interface
        """The backbone's keyword arguments with the adapter applied (``input_ids`` is always a keyword here)."""
        raise NotImplementedError

    def finish(self, output):
        """The backbone's output with the adapter's traces removed (default: unchanged)."""
        return output
