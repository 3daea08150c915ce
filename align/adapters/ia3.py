"""(IA)³: learned scaling vectors (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning", section 3.3).

An attention projection's output is scaled per output unit, y = l ⊙ (W x + b) with l (out,) (the paper's l_k, l_v on
keys and values); a feed-forward layer named in ``feedforward_modules`` has its input scaled instead,
y = W (l ⊙ x) + b with l (in,) (the paper's l_ff on the activation entering the down projection). Both fold into the
weight: W' = diag(l) W, b' = l ⊙ b for outputs; W' = W diag(l) for inputs. Saved as PEFT's ``ia3_l``: (out, 1) for
outputs, (1, in) for inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from . import base_layers as bl
from .config import AdapterConfig, Targets, _normalise_targets
from .errors import AdapterError
from .module import AdapterModule
from .registry import register_method
from .targeting import _matches

LLAMA_TARGETS = ("k_proj", "v_proj", "down_proj")  # PEFT's default for Llama-family models
LLAMA_FEEDFORWARD = ("down_proj",)


@dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """target_modules: the layers that get a vector (default: Llama's keys, values and down projection, as PEFT
    picks for Llama; GPT-2: ``["c_attn", "mlp.c_proj"]``); feedforward_modules: those among them whose *input* is
    scaled (same forms as target_modules; a list must be a subset of a list of targets); init_ia3_weights: True
    starts every vector at 1 (the adapter is the identity), False draws them from N(0, 1) (for tests)."""

    ignored_peft_keys: ClassVar[frozenset[str]] = frozenset({"modules_to_save"})

    target_modules: Targets = LLAMA_TARGETS
    feedforward_modules: Targets = LLAMA_FEEDFORWARD
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        feedforward = _normalise_targets(self.feedforward_modules, "feedforward_modules")
        object.__setattr__(self, "feedforward_modules", feedforward)
        targets = self.target_modules
        if isinstance(feedforward, tuple) and isinstance(targets, tuple) and not set(feedforward) <= set(targets):
            raise AdapterError(
                f"feedforward_modules {list(feedforward)} must be a subset of target_modules {list(targets)}; "
                "for GPT-2 use target_modules=['c_attn', 'mlp.c_proj'], feedforward_modules=['mlp.c_proj']"
            )


class IA3Module(AdapterModule):
    """One (IA)³ vector on one layer. ``is_feedforward``: the vector scales the layer's input, else its output."""

    def __init__(self, size: int, is_feedforward: bool, init: bool, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.is_feedforward = is_feedforward
        shape = (1, size) if is_feedforward else (size, 1)
        values = torch.ones(shape, device=device, dtype=dtype) if init else torch.randn(shape, device=device,
                                                                                         dtype=dtype)
        self.ia3_l = nn.Parameter(values)

    @classmethod
    def build(cls, config: IA3Config, base_layer: nn.Module, dtype: torch.dtype, path: str = "") -> IA3Module:
        d_in, d_out = bl.features(base_layer)
        feedforward = _matches(path, config.feedforward_modules)
        device = next((p.device for p in base_layer.parameters()), torch.device("cpu"))
        return cls(d_in if feedforward else d_out, feedforward, config.init_ia3_weights, device, dtype)

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        scale = self.ia3_l.flatten()
        if self.is_feedforward:  # cast as PEFT does: scale in the adapter dtype, then back to the input's
            return base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        result = base_layer(x)
        return (result * scale).to(result.dtype)

    @property
    def merge_refusal(self) -> str | None:
        if bool((self.ia3_l == 0).any()):
            return "a scale is exactly 0, so unmerge() could not divide it out again"
        return None

    def _scale(self, base_layer: nn.Module, undo: bool) -> None:
        """W <- W * l, or W / l to undo (columns for inputs, rows for outputs); the bias too for outputs."""
        scale = self.ia3_l.detach()  # (1, in) or (out, 1): broadcasts over the (out, in) weight
        apply = torch.div if undo else torch.mul
        bl.set_weight(base_layer, apply(bl.dense_weight(base_layer).to(scale.dtype), scale))
        bias = getattr(base_layer, "bias", None)
        if not self.is_feedforward and bias is not None:
            with torch.no_grad():
                bias.copy_(apply(bias.to(scale.dtype), scale.flatten()))

    def merge_into(self, base_layer: nn.Module) -> None:
        self._scale(base_layer, undo=False)

    def unmerge_from(self, base_layer: nn.Module) -> None:
        self._scale(base_layer, undo=True)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l}


register_method("IA3", IA3Config, IA3Module)
