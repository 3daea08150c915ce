"""Every adapter method as the adapter of the SFT, reward-model and DPO roles: two optimizer steps of the real
trainers (align/trainers), on tiny_llama. The trained adapter moves, the base and every other adapter stay put.

Prompt tuning lengthens the sequence inside the backbone only; hidden states come back at the input's length, so
the reward head reads the last real token and log-probs line up with the labels (checked against the full-logits
path here)."""

import datasets
import pytest
import torch

from align.adapters import (
    AdaLoraConfig,
    AdapterModel,
    BottleneckConfig,
    IA3Config,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from align.config.methods import DPOConfig, RewardConfig, SFTConfig
from align.data import SFTCollator
from align.models import tiny_llama
from align.trainers.dpo import build_dpo_trainer
from align.trainers.reward_model import build_reward_trainer, new_reward_head
from align.trainers.sft import build_sft_trainer, sft_loss

from ..trainers.helpers import PAD, loop_config, optim_config, preference_rows, sft_rows
from .helpers import nudge

METHODS = {
    "ia3": IA3Config(),
    "bottleneck": BottleneckConfig(bottleneck_size=8),
    "prompt": PromptTuningConfig(num_virtual_tokens=4),
    "prefix": PrefixTuningConfig(num_virtual_tokens=4),
    "adalora": AdaLoraConfig(init_r=4, target_r=2, total_step=2, target_modules=["q_proj", "v_proj"]),
}


def model_with(adapter: str, method: str) -> AdapterModel:
    """tiny_llama with adapter ``adapter`` of ``method`` plus an unrelated IA3 adapter that must not move."""
    model = AdapterModel(tiny_llama())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model.add_adapter(adapter, METHODS[method])
        model.add_adapter("bystander", IA3Config(init_ia3_weights=False), trainable=False)
    return model


def snapshot(model: AdapterModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def moved(before: dict[str, torch.Tensor], model: AdapterModel) -> set[str]:
    """Names of the parameters in ``before`` whose value changed."""
    return {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}


def adapter_names_of(model: AdapterModel, adapter: str) -> set[str]:
    ids = {id(p) for p in model.adapter_parameters(adapter)}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("method", METHODS)
def test_sft_role(method, tmp_path):
    model = model_with("sft", method)
    before = snapshot(model)
    trainer = build_sft_trainer(model, sft_rows(8), None, PAD, SFTConfig(), loop_config(max_steps=2),
                                optim_config(), tmp_path)
    metrics = trainer.fit()
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    changed = moved(before, model)
    assert changed and changed <= adapter_names_of(model, "sft")


@pytest.mark.parametrize("method", METHODS)
def test_reward_role(method, tmp_path):
    model = model_with("reward", method)
    head = new_reward_head(model)
    before = snapshot(model)
    trainer = build_reward_trainer(model, head, preference_rows(8, 0), None, PAD, RewardConfig(),
                                   loop_config(max_steps=2), optim_config(), tmp_path)
    metrics = trainer.fit()
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    changed = moved(before, model)
    assert changed and changed <= adapter_names_of(model, "reward")


@pytest.mark.parametrize("method", METHODS)
def test_dpo_role(method, tmp_path):
    """The policy is a trainable copy of the frozen 'sft' adapter of the same method; only the policy moves."""
    model = model_with("sft", method)
    nudge(model.adapter_parameters("sft"))  # a reference that differs from the bare base
    model.freeze("sft")
    before = snapshot(model)
    train_set = datasets.Dataset.from_list(preference_rows(8, 0))
    trainer = build_dpo_trainer(model, train_set, None, PAD, DPOConfig(), loop_config(max_steps=2), optim_config(),
                                tmp_path)
    assert type(model.configs["policy"]) is type(METHODS[method])
    metrics = trainer.fit()
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    new = set(model.state_dict()) - set(before)
    assert new and all("policy" in n for n in new)
    assert not moved(before, model)  # the base, the reference and the bystander did not move
    assert any(not torch.equal(p, q) for p, q in zip(model.adapter_parameters("policy"),
                                                        model.adapter_parameters("sft")))


def test_prompt_tuning_log_probs_match_full_logits():
    """SFT's chunked response log-probs under prompt tuning equal -log softmax of the model's own logits at the
    same (real-token) positions: the virtual positions are gone before the head reads anything."""
    model = model_with("sft", "prompt")
    batch = SFTCollator(PAD)(sft_rows(4, seed=5))
    loss_sum, _ = sft_loss(model, batch, SFTConfig(chunk_size=16))
    with torch.no_grad(), model.use("sft"):
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(full[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    expected = -(logps * batch["response_mask"][:, 1:]).sum()
    torch.testing.assert_close(loss_sum.detach(), expected, rtol=1e-5, atol=1e-5)
