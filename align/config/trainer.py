"""``trainer:`` config group: the shared loop (steps, batches, optimizer, schedule, precision, checkpoints)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from .errors import ConfigError

OptimizerName = Literal["adamw", "adamw_8bit"]
ScheduleName = Literal["constant", "linear", "cosine"]
Precision = Literal["fp32", "bf16"]


def _positive_int(key: str, value: object, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(key, value, f"an integer >= {minimum}")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _non_negative(key: str, value: object) -> None:
    if not _finite(value) or not value >= 0:
        raise ConfigError(key, value, "a finite number >= 0")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (or bitsandbytes 8-bit AdamW) with a warm-up then constant/linear/cosine schedule.
    ``max_grad_norm`` 0 turns clipping off."""

    name: OptimizerName = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: ScheduleName = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in get_args(OptimizerName):
            raise ConfigError("trainer.optimizer.name", self.name, f"one of {get_args(OptimizerName)}")
        if self.schedule not in get_args(ScheduleName):
            raise ConfigError("trainer.optimizer.schedule", self.schedule, f"one of {get_args(ScheduleName)}")
        if not _finite(self.lr) or not self.lr > 0:
            raise ConfigError("trainer.optimizer.lr", self.lr, "a finite positive number, e.g. 1e-4")
        for key in ("weight_decay", "eps", "max_grad_norm"):
            _non_negative(f"trainer.optimizer.{key}", getattr(self, key))
        for key in ("beta1", "beta2", "min_lr_ratio"):
            value = getattr(self, key)
            if not _finite(value) or not 0 <= value <= 1:
                raise ConfigError(f"trainer.optimizer.{key}", value, "a number in [0, 1]")
        _positive_int("trainer.optimizer.warmup_steps", self.warmup_steps, 0)


@dataclass(frozen=True)
class LoopConfig:
    """The shared loop. One optimizer step consumes ``grad_accum_steps`` micro-batches of
    ``micro_batch_size`` rows; losses are normalised over the whole step (tokens or pairs), so 8 x 1 equals 1 x 8.
    ``eval_every``/``save_every`` 0: only at the end. ``keep_checkpoints``: how many step checkpoints to keep.
    ``deepspeed``: path of a DeepSpeed JSON config (``configs/deepspeed/zero3.json``) to train through a DeepSpeed
    engine (ZeRO-2/3, CPU offload, several ranks); None trains in one plain PyTorch process."""

    max_steps: int = 100
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 1
    keep_checkpoints: int = 2
    precision: Precision = "fp32"
    seed: int = 0
    progress: bool = True
    deepspeed: str | None = None

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_every", "keep_checkpoints"):
            _positive_int(f"trainer.{key}", getattr(self, key))
        for key in ("eval_every", "save_every", "seed"):
            _positive_int(f"trainer.{key}", getattr(self, key), 0)
        if self.precision not in get_args(Precision):
            raise ConfigError("trainer.precision", self.precision,
                              f"one of {get_args(Precision)} (fp16 has no fast path on CPUs; use bf16)")
        if self.deepspeed is not None and (not isinstance(self.deepspeed, str) or not self.deepspeed):
            raise ConfigError("trainer.deepspeed", self.deepspeed,
                              "null or the path of a DeepSpeed JSON config, e.g. configs/deepspeed/zero2.json")

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps
