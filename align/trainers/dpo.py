"""DPO family on the shared base: the policy adapter is trained against a reference that is the frozen SFT adapter
(or the bare base when there is no SFT adapter) on the same base object, never a second model.

Chosen and rejected go through one concatenated forward. Reference log-probs are computed once before training
and stored with the rows (``precompute_reference``, default) or at every step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from align.adapters import AdapterModel, LoraConfig
from align.algos import dpo_implicit_rewards, get_dpo_loss, masked_sum
from align.config.methods import DPOConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.data import PreferenceCollator
from align.models.device import device_of, to_device
from align.models.forward import disable_dropout, response_token_logps

from .common import batches
from .data_stream import BatchStream
from .loop import Trainer

LENGTH_NORMALISED = ("ipo", "simpo")  # losses defined on per-token average log-probs


def sequence_logps(model: AdapterModel, batch: dict, adapter: str | None, cfg: DPOConfig) -> torch.Tensor:
    """(2B,) summed (or, for IPO/SimPO, averaged) response log-probs under ``adapter`` (None: bare base)."""
    with model.use(adapter):
        token_logps, mask = response_token_logps(model, batch, cfg.chunk_size)
    total = masked_sum(token_logps, mask, dim=-1)
    return total / mask.sum(-1).clamp(min=1) if cfg.loss in LENGTH_NORMALISED else total


class RefCollator:
    """PreferenceCollator that also carries precomputed reference log-probs (``ref_logps``: chosen then rejected)."""

    def __init__(self, pad_token_id: int) -> None:
        self.base = PreferenceCollator(pad_token_id)

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.base(rows)
        if "ref_chosen" in rows[0]:
            batch["ref_logps"] = torch.tensor([r["ref_chosen"] for r in rows] + [r["ref_rejected"] for r in rows])
        return batch


@torch.no_grad()
def reference_logps(model: AdapterModel, batch: dict, cfg: DPOConfig) -> torch.Tensor:
    """(2B,) log-probs under the reference, in eval mode: the frozen reference is one fixed function, so its
    adapter's dropout stays off whether it is precomputed or computed at every training step."""
    was_training = model.training
    model.eval()
    try:
        return sequence_logps(model, batch, cfg.reference, cfg)
    finally:
        model.train(was_training)


def precompute_reference(model: AdapterModel, dataset, pad_token_id: int, cfg: DPOConfig):
    """The dataset with ``ref_chosen`` / ``ref_rejected`` columns, computed once in eval mode."""
    collate = PreferenceCollator(pad_token_id)
    chosen, rejected = [], []
    for batch in batches(dataset, cfg.eval_batch_size, collate):
        c, r = reference_logps(model, batch, cfg).float().chunk(2)
        chosen += c.tolist()
        rejected += r.tolist()
    return dataset.add_column("ref_chosen", chosen).add_column("ref_rejected", rejected)


def dpo_loss(model: AdapterModel, batch: dict, cfg: DPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over pairs of the configured DPO-family loss, with the usual diagnostics."""
    batch = to_device(batch, device_of(model))
    policy_chosen, policy_rejected = sequence_logps(model, batch, cfg.policy, cfg).float().chunk(2)
    if cfg.loss == "simpo":  # reference-free
        ref_chosen, ref_rejected = torch.zeros_like(policy_chosen), torch.zeros_like(policy_rejected)
    elif "ref_logps" in batch:
        ref_chosen, ref_rejected = batch["ref_logps"].float().chunk(2)
    else:
        ref_chosen, ref_rejected = reference_logps(model, batch, cfg).float().chunk(2)
    options = {"cdpo": {"label_smoothing": cfg.label_smoothing}, "robust": {"label_smoothing": cfg.label_smoothing},
               "simpo": {"gamma": cfg.simpo_gamma}}.get(cfg.loss, {})
    losses = get_dpo_loss(cfg.loss)(policy_chosen, policy_rejected, ref_chosen, ref_rejected, cfg.beta, **options)
    chosen_tokens = batch["response_mask"][:, 1:].sum(-1).float().chunk(2)[0].clamp(min=1)
    chosen_nll = -(policy_chosen if cfg.loss in LENGTH_NORMALISED else policy_chosen / chosen_tokens)
    if cfg.rpo_alpha:  # RPO (Pang et al. 2024): keep the chosen responses likely while separating the pair
        losses = losses + cfg.rpo_alpha * chosen_nll
    reward_chosen, reward_rejected = dpo_implicit_rewards(policy_chosen.detach(), policy_rejected.detach(),
                                                          ref_chosen, ref_rejected, cfg.beta)
    return losses.sum(), {
        "rewards/chosen": reward_chosen.mean().item(),
        "rewards/rejected": reward_rejected.mean().item(),
        "rewards/margin": (reward_chosen - reward_rejected).mean().item(),
        "rewards/accuracy": (reward_chosen > reward_rejected).float().mean().item(),
        "logps/chosen": policy_chosen.mean().item(),
        "logps/accuracy": (policy_chosen > policy_rejected).float().mean().item(),
        "logps/rejected": policy_rejected.mean().item(),
        "nll/chosen": chosen_nll.mean().item(),
        # mean log-ratio on the data: an estimate of the policy's drift from the reference on these responses
        "kl_estimate": torch.cat([policy_chosen.detach() - ref_chosen,
                                  policy_rejected.detach() - ref_rejected]).mean().item(),
    }


def pairs(batch: dict) -> int:
    return batch["input_ids"].shape[0] // 2


def setup_policy(model: AdapterModel, cfg: DPOConfig, adapter_config: LoraConfig | None = None) -> None:
    """Create the policy adapter: a trainable copy of the reference adapter, or a fresh one when the reference is
    the bare base. An existing policy adapter (a resumed run) is kept."""
    if cfg.policy in model.adapter_names:
        return
    if cfg.reference is not None:
        if cfg.reference not in model.adapter_names:
            raise ValueError(f"trainer.dpo.reference={cfg.reference!r} is not an adapter of the model "
                             f"({model.adapter_names}); load the SFT adapter or set it to null for the bare base")
        model.freeze(cfg.reference)
        model.copy_adapter(cfg.reference, cfg.policy)
    else:
        model.add_adapter(cfg.policy, adapter_config or LoraConfig())


@torch.no_grad()
def evaluate_pairs(model: AdapterModel, dataset, collate, cfg: DPOConfig) -> dict[str, float]:
    totals: dict[str, float] = {}
    n = 0
    for batch in batches(dataset, cfg.eval_batch_size, collate):
        loss, metrics = dpo_loss(model, batch, cfg)
        k = pairs(batch)
        totals["loss"] = totals.get("loss", 0.0) + loss.item()
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value * k
        n += k
    return {f"eval/{k}": v / max(n, 1) for k, v in totals.items()}


def build_dpo_trainer(model: AdapterModel, train_set, eval_set, pad_token_id: int, cfg: DPOConfig,
                      loop: LoopConfig, optim: OptimizerConfig, out_dir: str | Path, tracker=None,
                      adapter_config: LoraConfig | None = None) -> Trainer:
    """Set up the policy and a ``Trainer`` for it. Reference log-probs are precomputed here when configured."""
    setup_policy(model, cfg, adapter_config)
    disable_dropout(model)  # policy and reference must see the same network; adapter dropout stays as configured
    collate = RefCollator(pad_token_id)
    if cfg.precompute_reference and cfg.loss != "simpo":  # SimPO needs no reference
        train_set = precompute_reference(model, train_set, pad_token_id, cfg)
        if eval_set:
            eval_set = precompute_reference(model, eval_set, pad_token_id, cfg)

    def evaluate() -> dict[str, float]:
        return evaluate_pairs(model, eval_set, collate, cfg) if eval_set else {}

    return Trainer(
        params=dict(model.named_adapter_parameters(cfg.policy)), modules=[model],
        loss_fn=lambda batch: dpo_loss(model, batch, cfg), count_fn=pairs,
        stream=BatchStream(train_set, loop.micro_batch_size, collate, seed=loop.seed), cfg=loop, optim=optim,
        out_dir=Path(out_dir), tracker=tracker, eval_fn=evaluate,
    )
