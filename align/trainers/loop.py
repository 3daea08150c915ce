"""The one training loop every trainer runs: accumulation, optimizer, schedule, clipping, precision, evaluation,
atomic checkpoints with exact resume, a NaN guard, tracking and a progress bar.

A trainer supplies a ``loss_fn(batch) -> (loss_sum, metrics)`` returning the SUM of its per-unit losses over the
micro-batch (units: response tokens for SFT, pairs for DPO and reward models) and ``count_fn(batch) -> units``.
The loop divides every micro-batch's sum by the units of the whole optimizer step, so gradient accumulation is
exact: 8 micro-batches of 1 give the same update as 1 of 8.

When an adapter being trained is AdaLoRA, the loop also drives its rank allocator (``adalora_hook.py``): the
orthogonal regulariser joins each step's loss and the allocator runs after each optimizer step, before the gradients
are cleared; its state goes into every checkpoint.
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

from .adalora_hook import DEEPSPEED_REFUSAL, AdaLoraHook
from .backend import TorchBackend, build_backend
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data_stream import BatchStream

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
    backend: Any = None  # TorchBackend by default; DeepSpeedBackend for ZeRO
    step: int = 0
    adalora: AdaLoraHook | None = field(default=None, init=False)  # built when an AdaLoRA adapter is trained

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        frozen = [name for name, p in self.params.items() if not p.requires_grad]
        if frozen:
            raise ValueError(f"parameters {frozen[:3]} are frozen; unfreeze the adapter before training it")
        self.adalora = AdaLoraHook.build(self.modules, self.params, self.cfg.max_steps)
        if self.adalora is not None and (self.cfg.deepspeed is not None
                                         or not isinstance(self.backend, (type(None), TorchBackend))):
            # under ZeRO the gradients live in the engine's partitioned buffers, not on the parameters, and the
            # engine clears them inside its step: the allocator could never see them
            raise ValueError(f"{DEEPSPEED_REFUSAL} (AdaLoRA adapters trained: {self.adalora.names})")
        if self.backend is None:  # built here, after every adapter exists (DeepSpeed needs that)
            self.backend = build_backend(self.modules, self.params, self.optim, self.cfg)
        self.stream.shard(self.backend.rank, self.backend.world_size)  # each rank its slice of the data
        self.checkpoint_dir = self.out_dir / "checkpoints"

    # ------------------------------------------------------------------------------------------ resume
    def resume(self) -> bool:
        """Load the newest checkpoint if there is one; True when training continues from it."""
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return False
        tensors, state = load_checkpoint(path, rank=self.backend.rank)
        missing = sorted(set(self.params) - set(tensors))
        if missing:
            raise RuntimeError(f"checkpoint {path} lacks trainable tensors {missing[:3]}: was it written by "
                               "another configuration? Delete it or use a fresh output directory")
        with torch.no_grad(), self.backend.gathered():
            for name, param in self.params.items():
                param.copy_(tensors[name])
        self.backend.load_state(path, state)
        if self.adalora is not None:
            self.adalora.load(path, state.get("adalora"))
        self.stream.load_state_dict(state["stream"])
        self.extra.set(state.get("extra", {}))
        self.step = state["step"]
        return True

    def save(self) -> Path:
        state = {"stream": self.stream.state_dict(), "extra": self.extra.get()}
        with self.backend.gathered():  # whole tensors, never ZeRO-3's empty shards
            trainable = {name: param.detach().cpu().clone() for name, param in self.params.items()}

        def write_extra(directory: Path) -> dict:
            out = self.backend.save_state(directory)
            if self.adalora is not None:
                out["adalora"] = self.adalora.save(directory)
            return out

        return save_checkpoint(self.checkpoint_dir, self.step, trainable, state, keep=self.cfg.keep_checkpoints,
                               write_extra=write_extra, rank=self.backend.rank, barrier=self.backend.barrier)

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
        total = self.backend.all_reduce_sum(sum(units))  # units of the whole step, over every rank
        if total == 0:
            raise TrainingDiverged(f"step {self.step + 1}: the micro-batches hold no trainable units (all masked)")
        sums: dict[str, float] = {}
        loss_total = 0.0
        for batch, n in zip(batches, units):
            with self._autocast():
                loss_sum, metrics = self.backend.forward(self.loss_fn, batch)
            if not torch.isfinite(loss_sum):
                raise TrainingDiverged(self._diverged_message("loss", loss_sum.item()))
            # each rank's gradients are averaged over ranks, so scale by world size to get the global mean
            self.backend.backward(loss_sum * (self.backend.world_size / total))
            loss_total += loss_sum.item()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value * n
        regularizer = self.adalora.regularization() if self.adalora is not None else None
        if regularizer is not None:  # AdaLoRA: once per step, added to the step's mean loss (as PEFT adds it)
            if not torch.isfinite(regularizer):
                raise TrainingDiverged(self._diverged_message("AdaLoRA's orthogonal regulariser", regularizer.item()))
            self.backend.backward(regularizer)
        grad_norm = self.backend.clip_and_norm()
        if not math.isfinite(grad_norm):
            self.backend.zero_grad()
            raise TrainingDiverged(self._diverged_message("gradient norm", grad_norm))
        lr = self.backend.lr  # the lr this step uses; backend.step() advances the schedule to the next one
        if self.adalora is None:
            self.backend.step()
        else:  # PEFT's order: update_and_allocate after optimizer.step(), while the gradients are still there
            self.backend.step(zero_grad=False)
            allocation = self.adalora.after_optimizer_step()
            self.backend.zero_grad()
        self.step += 1
        local = sum(units)
        out = {key: value / local for key, value in sums.items()}  # this rank's metrics
        out.update(loss=loss_total / local, grad_norm=grad_norm, lr=lr)
        if self.adalora is not None:
            reg = regularizer.item() if regularizer is not None else 0.0
            out.update({"loss": out["loss"] + reg, "adalora/orth_reg": reg, **allocation})
        return out

    def _diverged_message(self, what: str, value: float) -> str:
        last = latest_checkpoint(self.checkpoint_dir)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return (f"step {self.step + 1}: {what} is {value}; training stopped and nothing was saved for this step "
                f"({where}). Lower trainer.optimizer.lr, check the data, or use trainer.precision=fp32")

    def evaluate(self) -> dict[str, float]:
        if self.eval_fn is None:
            return {}
        self._train_mode(False)
        self.backend.before_eval()
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
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc=self.out_dir.name,
                   disable=not self.cfg.progress or self.backend.rank != 0, dynamic_ncols=True)
        while self.step < self.cfg.max_steps:
            last = self.train_step()
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(last.items())[:3]})
            if self._tracking and (self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps):
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

    @property
    def _tracking(self) -> bool:
        return self.tracker is not None and self.backend.rank == 0  # one rank reports

    def _log_eval(self, metrics: dict[str, float]) -> None:
        if metrics and self._tracking:
            self.tracker.log(metrics, step=self.step)
