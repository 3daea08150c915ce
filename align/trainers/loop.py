"""The one training loop every trainer runs: accumulation, optimizer, schedule, clipping, precision, evaluation,
atomic checkpoints with exact resume, a NaN guard, tracking and a progress bar.

A trainer supplies a ``loss_fn(batch) -> (loss_sum, metrics)`` returning the SUM of its per-unit losses over the
micro-batch (units: response tokens for SFT, pairs for DPO and reward models) and ``count_fn(batch) -> units``.
The loop divides every micro-batch's sum by the units of the whole optimizer step, so gradient accumulation is
exact: 8 micro-batches of 1 give the same update as 1 of 8.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from align.config.trainer import LoopConfig, OptimizerConfig

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data_stream import BatchStream
from .optim import build_optimizer, build_scheduler

LossFn = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite."""


@dataclass
class ExtraState:
    """Trainer state beyond weights and optimizer that a resume must restore (a KL controller, statistics...)."""

    get: Callable[[], dict] = dict
    set: Callable[[dict], None] = lambda state: None


@dataclass
class Trainer:
    """Runs ``cfg.max_steps`` optimizer steps over ``stream``. ``params`` are the tensors optimised and
    checkpointed, by unique name (an adapter's and a head's); ``modules`` are switched between train and eval."""

    params: dict[str, nn.Parameter]
    modules: list[nn.Module]
    loss_fn: LossFn
    count_fn: Callable[[Any], int]
    stream: BatchStream
    cfg: LoopConfig
    optim: OptimizerConfig
    out_dir: Path
    tracker: Any = None
    eval_fn: Callable[[], dict[str, float]] | None = None
    extra: ExtraState = field(default_factory=ExtraState)
    step: int = 0

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        frozen = [name for name, p in self.params.items() if not p.requires_grad]
        if frozen:
            raise ValueError(f"parameters {frozen[:3]} are frozen; unfreeze the adapter before training it")
        self.optimizer = build_optimizer(list(self.params.values()), self.optim)
        self.scheduler = build_scheduler(self.optimizer, self.optim, self.cfg.max_steps)
        self.checkpoint_dir = self.out_dir / "checkpoints"

    # ------------------------------------------------------------------------------------------ resume
    def resume(self) -> bool:
        """Load the newest checkpoint if there is one; True when training continues from it."""
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return False
        tensors, optimizer_state, state = load_checkpoint(path)
        missing = sorted(set(self.params) - set(tensors))
        if missing:
            raise RuntimeError(f"checkpoint {path} lacks trainable tensors {missing[:3]}: was it written by "
                               "another configuration? Delete it or use a fresh output directory")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(tensors[name])
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        self.extra.set(state.get("extra", {}))
        self.step = state["step"]
        return True

    def save(self) -> Path:
        state = {"scheduler": self.scheduler.state_dict(), "stream": self.stream.state_dict(),
                 "extra": self.extra.get()}
        return save_checkpoint(self.checkpoint_dir, self.step, self.params, self.optimizer.state_dict(), state,
                               keep=self.cfg.keep_checkpoints)

    # ---------------------------------------------------------------------------------------- training
    def _autocast(self):
        if self.cfg.precision == "bf16":
            device = next(iter(self.params.values())).device.type
            return torch.autocast(device_type=device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_mode(self, training: bool) -> None:
        for module in self.modules:
            module.train(training)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the step's metrics."""
        batches = [self.stream.next() for _ in range(self.cfg.grad_accum_steps)]
        units = [self.count_fn(b) for b in batches]
        total = sum(units)
        if total == 0:
            raise TrainingDiverged(f"step {self.step + 1}: the micro-batches hold no trainable units (all masked)")
        sums: dict[str, float] = {}
        loss_total = 0.0
        for batch, n in zip(batches, units):
            with self._autocast():
                loss_sum, metrics = self.loss_fn(batch)
            if not torch.isfinite(loss_sum):
                raise TrainingDiverged(self._diverged_message("loss", loss_sum.item()))
            (loss_sum / total).backward()
            loss_total += loss_sum.item()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value * n
        grad_norm = self._clip()
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(self._diverged_message("gradient norm", grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        out = {key: value / total for key, value in sums.items()}
        out.update(loss=loss_total / total, grad_norm=grad_norm, lr=self.scheduler.get_last_lr()[0])
        return out

    def _clip(self) -> float:
        params = [p for p in self.params.values() if p.grad is not None]
        max_norm = self.optim.max_grad_norm if self.optim.max_grad_norm > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0

    def _diverged_message(self, what: str, value: float) -> str:
        last = latest_checkpoint(self.checkpoint_dir)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return (f"step {self.step + 1}: {what} is {value}; training stopped and nothing was saved for this step "
                f"({where}). Lower trainer.optimizer.lr, check the data, or use trainer.precision=fp32")

    def evaluate(self) -> dict[str, float]:
        if self.eval_fn is None:
            return {}
        self._train_mode(False)
        with torch.no_grad(), self._autocast():
            metrics = self.eval_fn()
        self._train_mode(True)
        return metrics

    def fit(self) -> dict[str, float]:
        """Train to ``max_steps`` (resuming from the newest checkpoint), evaluate and checkpoint as configured.
        Returns the last training metrics merged with the final evaluation."""
        self.resume()
        self._train_mode(True)
        last: dict[str, float] = {}
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc=self.out_dir.name, disable=not self.cfg.progress,
                   dynamic_ncols=True)
        while self.step < self.cfg.max_steps:
            last = self.train_step()
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(last.items())[:3]})
            if self.tracker is not None and (self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps):
                self.tracker.log({f"train/{k}": v for k, v in last.items()}, step=self.step)
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.cfg.max_steps:
                self._log_eval(self.evaluate())
            if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                self.save()
        bar.close()
        final = self.evaluate()
        self._log_eval(final)
        last_saved = latest_checkpoint(self.checkpoint_dir)
        if last_saved is None or last_saved.name != f"step-{self.step:06d}":
            self.save()
        self._train_mode(False)
        return {**{f"train/{k}": v for k, v in last.items()}, **final}

    def _log_eval(self, metrics: dict[str, float]) -> None:
        if metrics and self.tracker is not None:
            self.tracker.log(metrics, step=self.step)
