"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"): LoRA in SVD form
whose rank is redistributed during training.

Each adapted layer holds P = lora_A (r, in), Λ = lora_E (r, 1) and Q = lora_B (out, r) and adds
y = W x + b + (alpha / (r0 + 1e-5)) * Q (Λ ⊙ P) x (eq. 3), r0 = init_r for every layer (PEFT's ``ranknum``; the
1e-5 is PEFT's). Triplet i of a layer (P_i, λ_i, Q_i) is scored by smoothed sensitivity times uncertainty of its
entries (eqs. 5-8, s(w) = |w ∂L/∂w|); ``AdaLoraAllocator`` zeroes the λ_i of the lowest-scoring triplets so that
the total rank follows a cubic budget schedule from r0 per layer to ``target_r`` per layer (eq. 9). The orthogonal
regulariser R = mean over matrices of ||P Pᵀ - I||_F and ||Qᵀ Q - I||_F (eq. 4) is the allocator's
``orthogonal_regularization()``, which the training loss adds.

The pruned ranks are saved as PEFT saves them: ``rank_pattern`` in adapter_config.json maps
``<layer path>.lora_E`` to a keep-mask over the r0 triplets, and the tensors hold only the kept rows/columns. A
layer built from such a config has rank sum(mask) and the same scale alpha / r0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from . import base_layers as bl
from .config import AdapterConfig
from .errors import AdapterError
from .module import AdapterModule
from .registry import register_method


@dataclass(frozen=True)
class AdaLoraConfig(AdapterConfig):
    """init_r: starting rank r0 per layer; target_r: average final rank; lora_alpha: scale numerator (PEFT's
    default 8); init_lora_weights: True (Λ = 0, P and Q ~ N(0, 0.02²): the identity at start) or False (all
    N(0, 1), for tests). Budget schedule over ``total_step`` steps: ``tinit`` warm-up steps at full rank, then the
    budget falls (cubic) and is re-allocated every ``deltaT`` steps, the last ``tfinal`` steps keep the final
    allocation. total_step None: the training loops (``align.trainers``) fill in their number of optimizer steps
    when a trainer is built; the allocator and ``save_adapter`` need it set. beta1 / beta2: EMA factors of
    sensitivity and uncertainty; orth_reg_weight: weight of R. rank_pattern: the saved keep-masks (written by the
    allocator)."""

    ignored_peft_keys: ClassVar[frozenset[str]] = frozenset({"r", "loftq_config", "alpha_pattern"})

    init_r: int = 12
    target_r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    init_lora_weights: bool = True
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 - PEFT's key
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_r, int) or self.init_r <= 0 or not isinstance(self.target_r, int) \
                or not 0 < self.target_r <= self.init_r:
            raise AdapterError(f"need 0 < target_r <= init_r (integers), got init_r={self.init_r!r}, "
                               f"target_r={self.target_r!r}")
        if self.total_step is not None:  # None: the training loop fills in its own number of optimizer steps
            self.check_schedule()
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise AdapterError(f"beta1 and beta2 must lie in (0, 1), got {self.beta1!r}, {self.beta2!r}")
        if self.lora_alpha <= 0 or self.orth_reg_weight < 0 or self.deltaT <= 0:
            raise AdapterError("need lora_alpha > 0, orth_reg_weight >= 0 and deltaT > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")

    def check_schedule(self) -> None:
        """Refuse a budget schedule that cannot run: total_step unset or not > 0, or no budgeting phase."""
        if not isinstance(self.total_step, int) or isinstance(self.total_step, bool) or self.total_step <= 0:
            raise AdapterError(f"AdaLoRA's budget schedule needs total_step > 0 (the training steps), got "
                               f"{self.total_step!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise AdapterError(f"tinit={self.tinit} and tfinal={self.tfinal} leave no budgeting phase in "
                               f"total_step={self.total_step}; lower them or raise total_step")

    def rank_of(self, path: str) -> int:
        """The rank of layer ``path``: the kept triplets of its saved mask, else init_r."""
        mask = (self.rank_pattern or {}).get(f"{path}.lora_E")
        return self.init_r if mask is None else int(sum(bool(m) for m in mask))

    def to_peft_dict(self) -> dict[str, Any]:
        if self.total_step is None:  # PEFT refuses to load an AdaLoRA config without it
            raise AdapterError("AdaLoRA adapter has total_step=None: set it (the training loops fill in their step "
                               "count) before saving")
        out = super().to_peft_dict()
        out.update(bias="none", use_dora=False, use_rslora=False, layers_to_transform=None)  # PEFT's LoRA keys
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> AdaLoraConfig:
        if data.get("bias", "none") != "none":
            raise AdapterError(f"{source}: AdaLoRA bias={data['bias']!r} is not supported; only 'none'")
        data = {k: v for k, v in data.items() if k != "bias"}
        return super().from_peft_dict(data, source)  # type: ignore[return-value]


class AdaLoraModule(AdapterModule):
    """P, Λ, Q of one layer (PEFT's parameter names). ``rank_mask`` (r,) is set by the allocator once it prunes:
    ``peft_state_dict`` then returns only the kept triplets, as PEFT saves them."""

    def __init__(self, config: AdaLoraConfig, rank: int, d_in: int, d_out: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.scaling = config.lora_alpha / (config.init_r + 1e-5)  # alpha / (ranknum + 1e-5), ranknum = r0
        self.lora_A = nn.Parameter(torch.randn(rank, d_in, device=device, dtype=dtype))
        self.lora_E = nn.Parameter(torch.randn(rank, 1, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.randn(d_out, rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.rank_mask: torch.Tensor | None = None
        if config.init_lora_weights:
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    @classmethod
    def build(cls, config: AdaLoraConfig, base_layer: nn.Module, dtype: torch.dtype, path: str = "") -> AdaLoraModule:
        d_in, d_out = bl.features(base_layer)
        device = next((p.device for p in base_layer.parameters()), torch.device("cpu"))
        return cls(config, config.rank_of(path), d_in, d_out, device, dtype)

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        result = base_layer(x)
        x = self.dropout(x.to(self.lora_A.dtype))
        update = (x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r0) Q (Λ ⊙ P), shape (out, in)."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling

    def merge_into(self, base_layer: nn.Module) -> None:
        bl.add_to_weight(base_layer, self.delta_weight().detach())

    def unmerge_from(self, base_layer: nn.Module) -> None:
        bl.add_to_weight(base_layer, -self.delta_weight().detach())

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        if self.rank_mask is None:
            return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}
        keep = self.rank_mask
        return {"lora_A": self.lora_A[keep], "lora_B": self.lora_B[:, keep], "lora_E": self.lora_E[keep]}

    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        if self.rank_mask is not None:
            raise AdapterError(f"{where}: cannot load into a pruned AdaLoRA adapter; add a fresh one")
        super().load_peft_state_dict(tensors, where)


register_method("ADALORA", AdaLoraConfig, AdaLoraModule)
