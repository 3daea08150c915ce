"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", figure 2; Pfeiffer
et al. 2021, "AdapterFusion", section 3).

The adapter wraps a layer's output h (B, T, d): h' = h + s * W_up f(W_down h + b_down) + s * b_up, with W_down
(b, d), W_up (d, b), a non-linearity f and scale s. Wrapping the attention output projection and the feed-forward
down projection puts it where Houlsby places it, on each sub-layer's output before the residual add
(``HOULSBY``); the feed-forward one alone is Pfeiffer's placement (``PFEIFFER``). W_up and b_up start at zero, so
a new adapter is the identity. PEFT has no such method: adapters are saved in align's own format, peft_type
``ALIGN_BOTTLENECK`` (see docs/adapters.md). The non-linearity means no weight matrix equals the adapted layer,
so it cannot be merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import base_layers as bl
from .config import AdapterConfig, Targets
from .errors import AdapterError
from .module import AdapterModule
from .registry import register_method

HOULSBY = ("o_proj", "down_proj")  # after attention and after the feed-forward block (Llama names)
PFEIFFER = ("down_proj",)  # after the feed-forward block only
GPT2_HOULSBY = ("attn.c_proj", "mlp.c_proj")
GPT2_PFEIFFER = ("mlp.c_proj",)
NON_LINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """target_modules: the layers whose output gets an adapter (``HOULSBY`` by default, ``PFEIFFER``, or the GPT-2
    forms); bottleneck_size: b; non_linearity: one of ``NON_LINEARITIES``; adapter_scaling: s; init_weights: True
    zeroes the up-projection (the identity at start), False leaves it random (for tests)."""

    target_modules: Targets = HOULSBY
    bottleneck_size: int = 64
    non_linearity: str = "relu"
    adapter_scaling: float = 1.0
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.bottleneck_size, int) or self.bottleneck_size <= 0:
            raise AdapterError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise AdapterError(f"non_linearity must be one of {sorted(NON_LINEARITIES)}, got {self.non_linearity!r}")


class BottleneckModule(AdapterModule):
    """Down-projection, non-linearity, up-projection and a residual, on one layer's output."""

    merge_refusal = ("a bottleneck adapter puts a non-linearity on the layer's output, which no weight matrix "
                     "reproduces; keep it as an adapter (or train LoRA / IA3 if you need a merged model)")

    def __init__(self, config: BottleneckConfig, d: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.scaling = config.adapter_scaling
        self.adapter_down = nn.Linear(d, config.bottleneck_size, device=device, dtype=dtype)
        self.non_linearity = NON_LINEARITIES[config.non_linearity]()
        self.adapter_up = nn.Linear(config.bottleneck_size, d, device=device, dtype=dtype)
        if config.init_weights:
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    @classmethod
    def build(cls, config: BottleneckConfig, base_layer: nn.Module, dtype: torch.dtype,
              path: str = "") -> BottleneckModule:
        _, d_out = bl.features(base_layer)
        device = next((p.device for p in base_layer.parameters()), torch.device("cpu"))
        return cls(config, d_out, device, dtype)

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        result = base_layer(x)
        hidden = result.to(self.adapter_down.weight.dtype)  # (..., d)
        update = self.adapter_up(self.non_linearity(self.adapter_down(hidden))) * self.scaling
        return result + update.to(result.dtype)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"adapter_down.weight": self.adapter_down.weight, "adapter_down.bias": self.adapter_down.bias,
                "adapter_up.weight": self.adapter_up.weight, "adapter_up.bias": self.adapter_up.bias}


register_method("ALIGN_BOTTLENECK", BottleneckConfig, BottleneckModule)
