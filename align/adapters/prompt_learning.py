"""What prompt tuning and prefix tuning share: a config without layer targets whose model-derived fields (PEFT's
``token_dim``, ``num_layers``, ``num_attention_heads``, ``num_transformer_submodules``) are filled in from the base
model when the adapter is added, and helpers that lengthen the attention mask and shift position ids by the
number of virtual tokens.

These methods need a transformers model: its ``config`` gives the sizes and its backbone (``base_model``) is what
they act on (see ``ModelAdapter``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .config import AdapterConfig, Targets
from .errors import AdapterError


@dataclass(frozen=True)
class PromptLearningConfig(AdapterConfig):
    """num_virtual_tokens: P. The remaining fields describe the base and are filled in by ``resolve``; a value
    given (or read from a PEFT file) must agree with the base."""

    ignored_peft_keys: ClassVar[frozenset[str]] = frozenset({"modules_to_save"})

    target_modules: Targets = None
    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:  # no layer targets: skip AdapterConfig's target checks
        if self.target_modules is not None or self.exclude_modules is not None:
            raise AdapterError(f"{type(self).__name__} acts on the whole model, not on layers: "
                               "target_modules / exclude_modules do not apply")
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise AdapterError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.num_transformer_submodules not in (None, 1):
            raise AdapterError("num_transformer_submodules must be 1: align adapts decoder-only causal LMs")

    def to_peft_dict(self) -> dict[str, Any]:
        out = super().to_peft_dict()
        del out["target_modules"], out["exclude_modules"]
        return out

    def resolve(self, model: nn.Module, **derived: int) -> PromptLearningConfig:
        """This config with ``derived`` fields (and the layer count, 1 submodule) filled in from ``model``; a field
        already set to another value is an error naming both."""
        derived = {"num_layers": model_size(model, "num_hidden_layers"), "num_transformer_submodules": 1,
                   **derived}
        for key, value in derived.items():
            given = getattr(self, key)
            if given is not None and given != value:
                raise AdapterError(f"{type(self).__name__}.{key}={given} but the base model has {value}: this "
                                   "adapter belongs to another base")
        return dataclasses.replace(self, **derived)


def model_size(model: nn.Module, key: str) -> int:
    """``model.config.<key>`` (transformers maps GPT-2's n_embd, n_layer, n_head onto the standard names)."""
    value = getattr(getattr(model, "config", None), key, None)
    if not isinstance(value, int):
        raise AdapterError(f"{type(model).__name__} has no config.{key}; prompt and prefix tuning need a "
                           "transformers causal LM")
    return value


def batch_size_of(kwargs: dict) -> int:
    ids = kwargs.get("input_ids")
    return int((ids if ids is not None else kwargs["inputs_embeds"]).shape[0])


def cache_is_empty(cache) -> bool:
    """True before the first forward of a sequence (no cache, or the empty cache ``generate`` passes in)."""
    return cache is None or cache.get_seq_length() == 0


def extend_attention_mask(kwargs: dict, num_virtual_tokens: int, batch_size: int) -> None:
    """Prepend P ones to a 2-D attention mask (B, T) -> (B, P + T): every token sees the virtual tokens."""
    mask = kwargs.get("attention_mask")
    if mask is None:
        return
    if mask.dim() != 2:
        raise AdapterError(f"prompt and prefix tuning need a 2-D attention mask (B, T); got shape "
                           f"{tuple(mask.shape)}")
    ones = torch.ones(batch_size, num_virtual_tokens, dtype=mask.dtype, device=mask.device)
    kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)


def shift_position_ids(kwargs: dict, num_virtual_tokens: int, prepend: bool) -> None:
    """Real tokens sit after the P virtual ones: position ids (B, T) + P; with ``prepend`` the virtual tokens'
    own positions 0..P-1 go in front -> (B, P + T)."""
    positions = kwargs.get("position_ids")
    if positions is None:
        return  # the model counts from the cache length, which already includes the virtual tokens
    shifted = positions + num_virtual_tokens
    if prepend:
        own = torch.arange(num_virtual_tokens, device=positions.device, dtype=positions.dtype)
        shifted = torch.cat([own.expand(*positions.shape[:-1], num_virtual_tokens), shifted], dim=-1)
    kwargs["position_ids"] = shifted
