"""DPO family on the shared base: the policy starts as a copy of the SFT adapter, the reference is the frozen
SFT adapter (or the bare base) on the same base object, precomputed reference log-probs equal on-the-fly ones
and a slow reference, the loss goes down on a toy task, and every configured loss runs."""

import math
from typing import get_args

import datasets
import pytest
import torch

from align.config.methods import DPOConfig, DPOLossName
from align.models import tiny_llama
from align.trainers.dpo import RefCollator, build_dpo_trainer, dpo_loss

from .helpers import PAD, loop_config, lora_model, max_difference, optim_config, preference_rows, snapshot

LOG2 = math.log(2.0)


def preference_set(n: int, seed: int) -> datasets.Dataset:
    return datasets.Dataset.from_list(preference_rows(n, seed))


def build(tmp_path, reference: str | None = "sft", dropout: float = 0.0, steps: int = 3, **dpo):
    """An SFT adapter with random (non-identity) weights, or none; the DPO trainer on top."""
    model = lora_model(reference, init=False, dropout=dropout) if reference else lora_model(adapter=None)
    cfg = DPOConfig(reference=reference, **dpo)
    loop = loop_config(max_steps=steps, micro_batch_size=4)
    train_set = preference_set(16, seed=0)
    trainer = build_dpo_trainer(model, train_set, None, PAD, cfg, loop, optim_config(lr=1e-2), tmp_path)
    return model, cfg, trainer


def slow_sequence_logps(plain_model, rows: list[dict]) -> torch.Tensor:
    """(2B,) sum of log p(response token | prefix) from the full logits of a plain transformers model, one
    row at a time (no padding): chosen rows first, then rejected."""
    out = []
    for side in ("chosen_ids", "rejected_ids"):
        for row in rows:
            ids = torch.tensor([row["prompt_ids"] + row[side]])
            logps = torch.log_softmax(plain_model(input_ids=ids).logits.float(), dim=-1)[0]
            start = len(row["prompt_ids"])
            out.append(sum(logps[t - 1, ids[0, t]] for t in range(start, ids.shape[1])))
    return torch.stack(out)


def base_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.model.named_parameters() if ".adapters." not in n}


# ------------------------------------------------------------------------------------------ start and sharing
def test_policy_starts_as_copy_of_sft_adapter(tmp_path):
    """Equal logits at step 0, so h = 0: the sigmoid loss is -log sigmoid(0) = log 2 per pair and the implicit
    rewards are exactly 0."""
    model, cfg, trainer = build(tmp_path, dropout=0.1, precompute_reference=False)
    model.eval()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    with model.use("sft"):
        sft_logits = model(input_ids=ids).logits
    with model.use("policy"):
        policy_logits = model(input_ids=ids).logits
    with model.disabled():
        base_logits = model(input_ids=ids).logits
    assert torch.equal(policy_logits, sft_logits)
    assert (policy_logits - base_logits).abs().max() > 1e-3  # the SFT adapter is not the identity
    sft, policy = dict(model.named_adapter_parameters("sft")), dict(model.named_adapter_parameters("policy"))
    assert sft.keys() == policy.keys() and set(trainer.params) == set(policy)
    assert all(not p.requires_grad for p in sft.values()) and all(p.requires_grad for p in policy.values())
    assert not {p.data_ptr() for p in sft.values()} & {p.data_ptr() for p in policy.values()}  # a copy

    loss_sum, metrics = dpo_loss(model, RefCollator(PAD)(preference_rows(4, seed=3)), cfg)
    assert loss_sum.item() == pytest.approx(4 * LOG2, rel=1e-7)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "kl_estimate"):
        assert metrics[key] == 0.0


def test_first_step_loss_is_log2_with_precomputed_reference(tmp_path):
    _, _, trainer = build(tmp_path)
    first = trainer.train_step()
    assert first["loss"] == pytest.approx(LOG2, abs=1e-6)  # reference in batches of 16, policy of 4
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-5)


def test_reference_runs_on_the_same_base_object(tmp_path):
    """One copy of the base weights: same storage before and after training, unchanged values, and the model's
    parameter count is the base plus two adapters (sft + policy), never a second base."""
    model = lora_model("sft", init=False)
    base_before = {n: (p.data_ptr(), p.detach().clone()) for n, p in base_parameters(model).items()}
    trainer = build_dpo_trainer(model, preference_set(16, seed=0), None, PAD, DPOConfig(),
                                loop_config(max_steps=3, micro_batch_size=4), optim_config(lr=1e-2), tmp_path)
    trainer.fit()
    base_after = base_parameters(model)
    assert base_after.keys() == base_before.keys()
    for name, (pointer, value) in base_before.items():
        assert base_after[name].data_ptr() == pointer and torch.equal(base_after[name], value)
        assert not base_after[name].requires_grad
    base_size = sum(p.numel() for p in tiny_llama().parameters())
    adapter_size = sum(p.numel() for p in model.adapter_parameters("sft"))
    assert sum(p.numel() for p in model.parameters()) == base_size + 2 * adapter_size


# ------------------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("reference", ["sft", None], ids=["sft-adapter", "bare-base"])
def test_precomputed_reference_equals_on_the_fly_and_slow_reference(reference, tmp_path):
    """After 3 steps (policy != reference), in train mode as during training, with adapter dropout 0.1:
    the precomputed columns equal the log-probs of a plain model holding the reference's weights (the SFT
    adapter merged into a fresh base, or the bare base), and dpo_loss gives the same loss with and without
    them. (Before the fix the on-the-fly reference ran with the SFT adapter's dropout on: 0.06 off.)"""
    model, cfg, trainer = build(tmp_path, reference=reference, dropout=0.1)
    trainer.fit()
    model.train()
    rows = [trainer.stream.dataset[i] for i in range(4)]
    batch = RefCollator(PAD)(rows)
    if reference is None:
        plain = tiny_llama()
    else:
        plain = lora_model("sft", init=False, dropout=0.1).merge_and_unload("sft")
    torch.testing.assert_close(batch["ref_logps"], slow_sequence_logps(plain, rows), rtol=0, atol=1e-4)

    torch.manual_seed(7)  # the same dropout masks for the policy forward of both calls
    precomputed_loss, precomputed = dpo_loss(model, batch, cfg)
    del batch["ref_logps"]
    torch.manual_seed(7)
    on_the_fly_loss, on_the_fly = dpo_loss(model, batch, cfg)
    assert abs(precomputed_loss.item() - 4 * LOG2) > 1e-3  # training moved the policy away from the reference
    torch.testing.assert_close(on_the_fly_loss, precomputed_loss, rtol=0, atol=1e-5)
    assert on_the_fly["rewards/margin"] == pytest.approx(precomputed["rewards/margin"], abs=1e-5)


# -------------------------------------------------------------------------------------------------- learning
def test_dpo_loss_decreases_on_toy_task(tmp_path):
    """Chosen responses hold token 7: 20 steps of 8 pairs (beta 0.5) lower the held-out loss from log 2
    (measured 0.575) and order most held-out pairs correctly (implicit reward of chosen above rejected:
    measured 0.91)."""
    model = lora_model("sft", init=False, r=8)
    cfg = DPOConfig(beta=0.5)
    loop = loop_config(max_steps=20, micro_batch_size=8)
    train_set, eval_set = preference_set(128, seed=0), preference_set(32, seed=1)
    trainer = build_dpo_trainer(model, train_set, eval_set, PAD, cfg, loop, optim_config(lr=1e-2), tmp_path)
    before = trainer.evaluate()
    after = trainer.fit()
    assert before["eval/loss"] == pytest.approx(LOG2, abs=1e-5)
    assert after["eval/loss"] < LOG2 - 0.05
    assert after["eval/rewards/accuracy"] >= 0.8
    assert after["eval/rewards/chosen"] > after["eval/rewards/rejected"]


@pytest.mark.parametrize("loss", get_args(DPOLossName))
def test_every_loss_runs(loss, tmp_path):
    """Two steps with finite losses and metrics; one concatenated forward per micro-batch (the reference was
    precomputed, and SimPO needs none)."""
    smoothing = 0.1 if loss in ("cdpo", "robust") else 0.0
    model, _, trainer = build(tmp_path, steps=2, loss=loss, label_smoothing=smoothing)
    forwards = []
    model.model.model.register_forward_hook(lambda module, args, output: forwards.append(1))
    start = snapshot(trainer.params)
    metrics = trainer.fit()
    assert trainer.step == 2 and len(forwards) == 2
    assert all(math.isfinite(v) for v in metrics.values())
    assert max_difference(snapshot(trainer.params), start) > 1e-4
