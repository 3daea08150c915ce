"""Supervised fine-tuning: completion-only negative log-likelihood on one adapter of the frozen base."""

from __future__ import annotations

from pathlib import Path

import torch

from align.adapters import AdapterModel
from align.config.methods import SFTConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.data import SFTCollator
from align.models.forward import response_token_logps

from .common import batches
from .data_stream import BatchStream
from .loop import Trainer


def sft_loss(model: AdapterModel, batch: dict, cfg: SFTConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of -log p over response tokens (the loop divides by the step's token count)."""
    with model.use(cfg.adapter):
        token_logps, mask = response_token_logps(model, batch, cfg.chunk_size)
    n = int(mask.sum())
    return -token_logps.sum(), {"nll": -token_logps.sum().item() / max(n, 1)}


def response_tokens(batch: dict) -> int:
    return int(batch["response_mask"][:, 1:].sum())


@torch.no_grad()
def heldout_nll(model: AdapterModel, dataset, collate, cfg: SFTConfig, adapter: str | None) -> float:
    """Mean NLL per response token of ``adapter`` (None: the bare base) over ``dataset``."""
    total, count = 0.0, 0
    for batch in batches(dataset, cfg.eval_batch_size, collate):
        with model.use(adapter):
            token_logps, mask = response_token_logps(model, batch, cfg.chunk_size)
        total -= token_logps.sum().item()
        count += int(mask.sum())
    return total / max(count, 1)


def build_sft_trainer(model: AdapterModel, train_set, eval_set, pad_token_id: int, cfg: SFTConfig,
                      loop: LoopConfig, optim: OptimizerConfig, out_dir: str | Path, tracker=None) -> Trainer:
    """A ``Trainer`` for SFT of adapter ``cfg.adapter`` (which must exist and be trainable)."""
    if cfg.adapter not in model.adapter_names:
        raise ValueError(f"trainer.sft.adapter={cfg.adapter!r} is not an adapter of the model "
                         f"(adapters: {model.adapter_names}); add it first")
    collate = SFTCollator(pad_token_id)
    stream = BatchStream(train_set, loop.micro_batch_size, collate, seed=loop.seed)

    def evaluate() -> dict[str, float]:
        return {"eval/nll": heldout_nll(model, eval_set, collate, cfg, cfg.adapter)} if eval_set else {}

    return Trainer(
        params=dict(model.named_adapter_parameters(cfg.adapter)), modules=[model], loss_fn=lambda batch: sft_loss(model, batch, cfg), count_fn=response_tokens,
        stream=stream, cfg=loop, optim=optim, out_dir=Path(out_dir), tracker=tracker, eval_fn=evaluate,
    )
