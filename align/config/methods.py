"""Per-method trainer settings (``trainer.sft``, ``trainer.reward``, ``trainer.dpo``). Plain floats for the math."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from .errors import ConfigError

DPOLossName = Literal["sigmoid", "ipo", "hinge", "cdpo", "robust", "simpo"]


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SFTConfig:
    """Completion-only causal-LM loss on the ``adapter`` (token mean over response tokens)."""

    adapter: str = "sft"
    chunk_size: int = 4096
    eval_batch_size: int = 32


@dataclass(frozen=True)
class RewardConfig:
    """Bradley-Terry reward model: ``adapter`` + a scalar head read at the last token. ``margin`` adds a fixed
    margin to the loss; ``center_rewards`` adds coef * (r_c + r_r)^2 to keep scores near zero (0 = off)."""

    adapter: str = "reward"
    margin: float = 0.0
    center_rewards: float = 0.0
    eval_batch_size: int = 32
    stats_rows: int = 512

    def __post_init__(self) -> None:
        if not _finite(self.margin):
            raise ConfigError("trainer.reward.margin", self.margin, "a finite number")
        if not _finite(self.center_rewards) or not self.center_rewards >= 0:
            raise ConfigError("trainer.reward.center_rewards", self.center_rewards, "a finite number >= 0")


@dataclass(frozen=True)
class DPOConfig:
    """DPO family. The policy adapter starts as a copy of ``reference`` (the SFT adapter) or fresh when there is
    none, in which case the reference is the bare base. ``precompute_reference``: compute the reference log-probs
    once before training (default) instead of at every step. ``rpo_alpha`` > 0 adds alpha times the per-token NLL
    of the chosen response (RPO, Pang et al. 2024), which stops DPO from lowering the likelihood of both responses."""

    beta: float = 0.1
    loss: DPOLossName = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    rpo_alpha: float = 0.0
    policy: str = "policy"
    reference: str | None = "sft"
    precompute_reference: bool = True
    chunk_size: int = 4096
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        if not _finite(self.beta) or not self.beta > 0:
            raise ConfigError("trainer.dpo.beta", self.beta, "a finite positive number, e.g. 0.1")
        if self.loss not in get_args(DPOLossName):
            raise ConfigError("trainer.dpo.loss", self.loss, f"one of {get_args(DPOLossName)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("trainer.dpo.label_smoothing", self.label_smoothing, "a number in [0, 0.5)")
        if not _finite(self.rpo_alpha) or not self.rpo_alpha >= 0:
            raise ConfigError("trainer.dpo.rpo_alpha", self.rpo_alpha, "a finite number >= 0 (0 = plain DPO)")
        if not _finite(self.simpo_gamma):
            raise ConfigError("trainer.dpo.simpo_gamma", self.simpo_gamma, "a finite number")
        if self.label_smoothing and self.loss not in ("cdpo", "robust"):
            raise ConfigError("trainer.dpo.label_smoothing", self.label_smoothing,
                              "0 unless trainer.dpo.loss is 'cdpo' or 'robust'")
