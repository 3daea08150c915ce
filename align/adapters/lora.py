"""LoRA, rsLoRA and DoRA.

LoRA (Hu et al. 2021): y = W x + b + s * B A dropout(x), A (r, in), B (out, r), s = alpha / r.
rsLoRA (Kalajdzievski 2023): s = alpha / sqrt(r), which keeps the update's scale stable as r grows.
DoRA (Liu et al. 2024, eq. 5): W' = m * (W + s B A) / ||W + s B A||_c with a learned magnitude m (out,), the
column norm taken per output unit over the input dimension; the norm is detached from the graph as in the paper's
section 4.3, so y = (m / n) (W + s B A) x + b with n = ||W + s B A|| treated as a constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from . import base_layers as bl
from .config import AdapterConfig
from .errors import AdapterError
from .module import AdapterModule
from .registry import register_method

BIAS_MODES = ("none", "lora_only")
INIT_MODES = (True, False, "gaussian")


@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """r: rank; lora_alpha: scale numerator; lora_dropout: dropout on the adapter's input;
    bias: 'none' or 'lora_only' (the adapter owns a trainable copy of each adapted layer's bias; the shared base's
    biases are never trained, so PEFT's 'all' is refused); init_lora_weights: True (A Kaiming-uniform, B zero, so
    the adapter starts as the identity), 'gaussian' (A ~ N(0, 1/r), B zero) or False (both random, for tests);
    use_rslora: alpha / sqrt(r) scaling; use_dora: weight-decomposed LoRA."""

    ignored_peft_keys: ClassVar[frozenset[str]] = frozenset({"loftq_config", "rank_pattern", "alpha_pattern"})

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    bias: str = "none"
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    use_dora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise AdapterError(f"r must be a positive integer, got {self.r!r}")
        if self.lora_alpha <= 0:
            raise AdapterError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias == "all":
            raise AdapterError(
                "bias='all' would train the biases of the shared frozen base, which every other adapter uses; "
                "use bias='lora_only' (each adapter owns a copy of its layers' biases) or 'none'"
            )
        if self.bias not in BIAS_MODES:
            raise AdapterError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init_lora_weights not in INIT_MODES:
            raise AdapterError(f"init_lora_weights must be one of {INIT_MODES}, got {self.init_lora_weights!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft_dict(self) -> dict[str, Any]:
        out = super().to_peft_dict()
        out.update(rank_pattern={}, alpha_pattern={}, lora_bias=False, layers_to_transform=None, modules_to_save=None)
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        for key in ("rank_pattern", "alpha_pattern"):
            if data.get(key):
                raise AdapterError(f"{source}: per-layer {key} is not supported yet; got {data[key]!r}")
        return super().from_peft_dict(data, source)  # type: ignore[return-value]


class LoraModule(AdapterModule):
    """One LoRA adapter on one base layer. Parameter names are PEFT's (lora_A.weight, lora_B.weight), so the
    PEFT state dict is this module's state dict with a prefix."""

    def __init__(self, config: LoraConfig, d_in: int, d_out: int, base_bias: torch.Tensor | None,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.scaling = config.scaling
        self.lora_A = nn.Linear(d_in, config.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(config.r, d_out, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.bias = None
        if config.bias == "lora_only" and base_bias is not None:
            self.bias = nn.Parameter(base_bias.detach().to(device=device, dtype=dtype).clone())
        self._init_weights(config)

    def _init_weights(self, config: LoraConfig) -> None:
        if config.init_lora_weights is False:
            return  # nn.Linear's own init for A and B: the adapter starts away from the identity
        if config.init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / config.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @classmethod
    def build(cls, config: LoraConfig, base_layer: nn.Module, dtype: torch.dtype, path: str = "") -> LoraModule:
        d_in, d_out = bl.features(base_layer)
        device = _param_device(base_layer)
        return cls(config, d_in, d_out, getattr(base_layer, "bias", None), device, dtype)

    def _bias_shift(self, base_layer: nn.Module) -> torch.Tensor | int:
        if self.bias is None:
            return 0
        return self.bias - base_layer.bias.to(self.bias.dtype)

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        result = base_layer(x)
        x = self.dropout(x.to(self.lora_A.weight.dtype))
        # the scale multiplies the rank-r intermediate, not the (B, T, out) output: one pass over r columns
        update = self.lora_B(self.lora_A(x) * self.scaling)
        if self.bias is not None:  # skipped otherwise: adding 0 would allocate another (B, T, out) tensor
            update = update + self._bias_shift(base_layer)
        if bl.is_8bit(base_layer):  # its output is a view made inside bitsandbytes' autograd Function (3-D
            return result + update.to(result.dtype)  # input), which autograd forbids changing in place
        # in place: the base layer's output is a fresh tensor no backward reads (a linear saves its input, not its
        # output), so this saves a (B, T, out) allocation per layer; autograd's version check would catch a base
        # layer that did save it
        return result.add_(update.to(result.dtype))

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A, shape (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merge_into(self, base_layer: nn.Module) -> None:
        bl.add_to_weight(base_layer, self.delta_weight().detach())
        self._swap_bias(base_layer)

    def unmerge_from(self, base_layer: nn.Module) -> None:
        bl.add_to_weight(base_layer, -self.delta_weight().detach())
        self._swap_bias(base_layer)

    def _swap_bias(self, base_layer: nn.Module) -> None:
        if self.bias is not None:
            with torch.no_grad():
                own = self.bias.detach().clone()
                self.bias.copy_(base_layer.bias.to(self.bias.dtype))
                base_layer.bias.copy_(own.to(base_layer.bias.dtype))

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        out = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.bias is not None:
            out["base_layer.bias"] = self.bias
        return out


class DoraModule(LoraModule):
    """LoRA plus a learned magnitude per output unit (PEFT key ``lora_magnitude_vector``)."""

    def __init__(self, config: LoraConfig, d_in: int, d_out: int, base_bias: torch.Tensor | None,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(config, d_in, d_out, base_bias, device, dtype)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(d_out, device=device, dtype=dtype))
        self._merged_norm: torch.Tensor | None = None

    @classmethod
    def build(cls, config: LoraConfig, base_layer: nn.Module, dtype: torch.dtype, path: str = "") -> DoraModule:
        module = super().build(config, base_layer, dtype)
        if module.lora_A.weight.device.type != "meta":
            with torch.no_grad():  # m starts as the column norm of W + s B A, so DoRA starts equal to LoRA
                module.lora_magnitude_vector.copy_(module._weight_norm(bl.dense_weight(base_layer)))
        return module

    def _weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| per output unit, shape (out,), detached (DoRA section 4.3)."""
        combined = weight.to(self.lora_A.weight.dtype) + self.delta_weight()
        return torch.linalg.vector_norm(combined, dim=1).detach()

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        result = base_layer(x)
        dtype = self.lora_A.weight.dtype
        weight = bl.dense_weight(base_layer).to(dtype)
        x_in = self.dropout(x.to(dtype))
        bias = getattr(base_layer, "bias", None)
        scale = self.lora_magnitude_vector / self._weight_norm(weight)  # (out,)
        lora_out = self.lora_B(self.lora_A(x_in)) * self.scaling
        if isinstance(self.dropout, nn.Identity) or not self.training:
            # y = m / n * (W + s B A) x + b: one (B, T, out) tensor, z, is kept for backward (the two-term form
            # (m/n - 1) W x + (m/n) s B A x keeps both W x and s B A x alive until backward).
            z = (result - bias if bias is not None else result).to(dtype) + lora_out
            out = scale * z
            own_bias = self.bias if self.bias is not None else bias
            if own_bias is not None:
                out = out + own_bias.to(dtype)
            return out.to(result.dtype)
        base_out = nn.functional.linear(x_in, weight)  # W dropout(x): the dropped input feeds both terms
        # y = W x + b + m / n * (W + s B A) dropout(x) - W dropout(x)
        update = scale * (base_out + lora_out) - base_out
        if self.bias is not None:
            update = update + self._bias_shift(base_layer)
        return result + update.to(result.dtype)

    def merge_into(self, base_layer: nn.Module) -> None:
        weight = bl.dense_weight(base_layer).to(self.lora_A.weight.dtype)
        norm = self._weight_norm(weight)
        merged = (weight + self.delta_weight().detach()) * (self.lora_magnitude_vector.detach() / norm)[:, None]
        bl.set_weight(base_layer, merged)
        self._merged_norm = norm
        self._swap_bias(base_layer)

    def unmerge_from(self, base_layer: nn.Module) -> None:
        merged = bl.dense_weight(base_layer).to(self.lora_A.weight.dtype)
        factor = (self.lora_magnitude_vector.detach() / self._merged_norm)[:, None]
        bl.set_weight(base_layer, merged / factor - self.delta_weight().detach())
        self._merged_norm = None
        self._swap_bias(base_layer)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        out = super().peft_state_dict()
        out["lora_magnitude_vector"] = self.lora_magnitude_vector
        return out


def _param_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class _LoraFamily(AdapterModule):
    """Dispatches a LoraConfig to LoRA or DoRA at build time (one PEFT type, 'LORA', covers both)."""

    @classmethod
    def build(cls, config: LoraConfig, base_layer: nn.Module, dtype: torch.dtype, path: str = "") -> AdapterModule:
        return (DoraModule if config.use_dora else LoraModule).build(config, base_layer, dtype, path)


register_method("LORA", LoraConfig, _LoraFamily)
