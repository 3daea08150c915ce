"""Optimisation back-ends of the shared loop. The loop runs each micro-batch's loss through ``forward`` and calls
``backward``, ``step``, ``all_reduce_sum`` and the checkpoint hooks; how gradients are reduced and parameters updated
is the back-end's business.

``TorchBackend`` is plain single-process PyTorch. ``align.distributed.deepspeed.DeepSpeedBackend`` implements the
same methods on a DeepSpeed engine (ZeRO-2/3, CPU offload, several ranks).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from align.config.trainer import LoopConfig, OptimizerConfig

from .optim import build_optimizer, build_scheduler

OPTIMIZER_FILE = "optimizer.pt"


class TorchBackend:
    """AdamW (or 8-bit AdamW) with warm-up and decay, gradient clipping, one process."""

    rank = 0
    world_size = 1
    synced_forwards = False  # ranks that must run the same number of forwards (ZeRO-3 gathers in every forward)
    reduce_sum = None  # the all-reduce of a data-parallel run (a tensor summed over ranks); one process: none

    def __init__(self, params: dict[str, nn.Parameter], cfg: OptimizerConfig, total_steps: int) -> None:
        self.params, self.cfg = params, cfg
        self.optimizer = build_optimizer(list(params.values()), cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, total_steps)

    def forward(self, loss_fn, batch):
        """``loss_fn(batch)``; DeepSpeed runs it through its engine."""
        return loss_fn(batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_and_norm(self) -> float:
        """Clip gradients to ``max_grad_norm`` (0: no clipping) and return the norm before clipping."""
        grads = [p for p in self.params.values() if p.grad is not None]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm)) if grads else 0.0

    def step(self, zero_grad: bool = True) -> None:
        """Update, advance the schedule and (unless ``zero_grad`` is False: AdaLoRA's allocator still needs the
        gradients; the caller clears them) clear the gradients."""
        self.optimizer.step()
        self.scheduler.step()
        if zero_grad:
            self.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def all_reduce_sum(self, value: int) -> int:
        return value

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for here)."""

    def before_eval(self) -> None:
        """Make the model usable outside the training step (nothing to do in one process)."""

    def gathered(self) -> contextlib.AbstractContextManager:
        """A block where the trainable tensors are whole (DeepSpeed ZeRO-3 partitions them over ranks)."""
        return contextlib.nullcontext()

    # checkpoint hooks: called on every rank with the checkpoint's directory
    def save_state(self, directory: Path) -> dict:
        torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)
        return {"scheduler": self.scheduler.state_dict()}

    def load_state(self, directory: Path, state: dict) -> None:
        self.optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, weights_only=True))
        self.scheduler.load_state_dict(state["scheduler"])


def build_backend(modules: list[nn.Module], params: dict[str, nn.Parameter], optim: OptimizerConfig,
                  loop: LoopConfig):
    """``DeepSpeedBackend`` when ``loop.deepspeed`` names a DeepSpeed config, else ``TorchBackend``; the
    learning-rate schedule spans ``loop.max_steps`` optimizer steps."""
    if loop.deepspeed is None:
        return TorchBackend(params, optim, loop.max_steps)
    from align.distributed.deepspeed import DeepSpeedBackend  # deepspeed is imported only when asked for

    return DeepSpeedBackend(modules, params, optim, loop, loop.deepspeed)
