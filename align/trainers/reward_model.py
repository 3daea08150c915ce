"""Reward model: the frozen base + a ``reward`` adapter + a scalar head read at the last token, trained with the
Bradley-Terry loss on preference pairs. After training the head stores the mean and std of its rewards over a
reference set, and is always saved beside the adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from align.adapters import AdapterModel
from align.algos import bradley_terry_loss
from align.config.methods import RewardConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.data import PreferenceCollator
from align.models.device import device_of, to_device
from align.models.forward import hidden_states, last_token_hidden
from align.models.heads import ScalarHead

from .common import batches
from .data_stream import BatchStream
from .loop import Trainer


def sequence_rewards(model: AdapterModel, head: ScalarHead, batch: dict, adapter: str) -> torch.Tensor:
    """Raw rewards (B,) of the batch's sequences under ``adapter`` + ``head``."""
    batch = to_device(batch, device_of(model))
    with model.use(adapter):
        hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    return head(last_token_hidden(hidden, batch["attention_mask"]))


def reward_loss(model: AdapterModel, head: ScalarHead, batch: dict,
                cfg: RewardConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over pairs of the Bradley-Terry loss; the batch holds B chosen rows then B rejected rows."""
    chosen, rejected = sequence_rewards(model, head, batch, cfg.adapter).float().chunk(2)
    margin = torch.full_like(chosen, cfg.margin) if cfg.margin else None
    losses = bradley_terry_loss(chosen, rejected, margin)
    if cfg.center_rewards:
        losses = losses + cfg.center_rewards * (chosen + rejected) ** 2
    return losses.sum(), {"accuracy": (chosen > rejected).float().mean().item(),
                          "margin": (chosen - rejected).mean().item()}


def pairs(batch: dict) -> int:
    return batch["input_ids"].shape[0] // 2


@torch.no_grad()
def pairwise_accuracy(model: AdapterModel, head: ScalarHead, dataset, collate, cfg: RewardConfig) -> dict[str, float]:
    """Held-out accuracy (chosen scored above rejected, ties count half) and mean margin."""
    correct, margin, n = 0.0, 0.0, 0
    for batch in batches(dataset, cfg.eval_batch_size, collate):
        chosen, rejected = sequence_rewards(model, head, batch, cfg.adapter).float().chunk(2)
        correct += ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).sum().item()
        margin += (chosen - rejected).sum().item()
        n += chosen.numel()
    return {"accuracy": correct / max(n, 1), "margin": margin / max(n, 1)}


@torch.no_grad()
def fit_statistics(model: AdapterModel, head: ScalarHead, dataset, collate, cfg: RewardConfig) -> None:
    """Store mean/std of the rewards of up to ``cfg.stats_rows`` pairs (both responses) in the head."""
    count = min(len(dataset), cfg.stats_rows)
    rows = dataset.select(range(count)) if hasattr(dataset, "select") else dataset[:count]
    rewards = torch.cat([sequence_rewards(model, head, b, cfg.adapter).float()
                         for b in batches(rows, cfg.eval_batch_size, collate)])
    head.set_statistics(rewards)


def new_reward_head(model: AdapterModel) -> ScalarHead:
    return ScalarHead(model.config.hidden_size, "score", dtype=model.adapter_dtype).to(device_of(model))


def build_reward_trainer(model: AdapterModel, head: ScalarHead, train_set, eval_set, pad_token_id: int,
                         cfg: RewardConfig, loop: LoopConfig, optim: OptimizerConfig, out_dir: str | Path,
                         tracker=None) -> Trainer:
    """A ``Trainer`` for adapter ``cfg.adapter`` + ``head`` on preference pairs."""
    if cfg.adapter not in model.adapter_names:
        raise ValueError(f"trainer.reward.adapter={cfg.adapter!r} is not an adapter of the model "
                         f"(adapters: {model.adapter_names}); add it first")
    collate = PreferenceCollator(pad_token_id)
    params = {f"adapter.{n}": p for n, p in model.named_adapter_parameters(cfg.adapter)}
    params.update({f"head.{n}": p for n, p in head.named_parameters()})

    def evaluate() -> dict[str, float]:
        if not eval_set:
            return {}
        return {f"eval/{k}": v for k, v in pairwise_accuracy(model, head, eval_set, collate, cfg).items()}

    return Trainer(
        params=params, modules=[model, head], loss_fn=lambda batch: reward_loss(model, head, batch, cfg),
        count_fn=pairs, stream=BatchStream(train_set, loop.micro_batch_size, collate, seed=loop.seed), cfg=loop,
        optim=optim, out_dir=Path(out_dir), tracker=tracker, eval_fn=evaluate,
    )
