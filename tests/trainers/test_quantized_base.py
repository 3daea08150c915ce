"""Every trainer runs on a 4-bit NF4 base as well as on a full-precision one (the config's model.quantization)."""

import datasets
import pytest
import torch

from align.adapters import AdapterModel, LoraConfig
from align.config.methods import DPOConfig, RewardConfig, SFTConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.models import quantize_linear_layers, tiny_llama
from align.trainers.dpo import build_dpo_trainer
from align.trainers.reward_model import build_reward_trainer, new_reward_head
from align.trainers.sft import build_sft_trainer

LOOP = LoopConfig(max_steps=4, micro_batch_size=4, progress=False)
OPTIM = OptimizerConfig(lr=1e-2)


def _base(quantization: str):
    base = tiny_llama(hidden_size=64, intermediate_size=128)
    return quantize_linear_layers(base, quantization) if quantization != "none" else base


def _sft_rows(n=8):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        prompt = torch.randint(3, 128, (5,), generator=gen).tolist()
        rows.append({"input_ids": [1, *prompt, *prompt, 2], "response_mask": [False] * 6 + [True] * 6})
    return rows


def _pref_rows(n=8):
    gen = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        prompt = torch.randint(3, 128, (4,), generator=gen).tolist()
        rows.append({"prompt_ids": [1, *prompt], "chosen_ids": [7, 7, 2],
                     "rejected_ids": torch.randint(10, 128, (3,), generator=gen).tolist() + [2]})
    return datasets.Dataset.from_list(rows)


def _snapshot(params):
    return {k: v.detach().clone() for k, v in params.items()}


def _changed(before, params):
    return all(not torch.equal(before[k], v) for k, v in params.items() if k.endswith("lora_B.weight"))


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_sft_reward_and_dpo_train_on_the_base(quantization, tmp_path):
    model = AdapterModel(_base(quantization))
    model.add_adapter("sft", LoraConfig(r=4))
    trainer = build_sft_trainer(model, _sft_rows(), _sft_rows(4), 0, SFTConfig(), LOOP, OPTIM, tmp_path / "sft")
    before = _snapshot(trainer.params)
    metrics = trainer.fit()
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and _changed(before, trainer.params)

    model.freeze("sft")
    model.copy_adapter("sft", "reward")
    head = new_reward_head(model)
    trainer = build_reward_trainer(model, head, _pref_rows(), _pref_rows(4), 0, RewardConfig(), LOOP, OPTIM,
                                   tmp_path / "rm")
    before = _snapshot(trainer.params)
    metrics = trainer.fit()
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0 and _changed(before, trainer.params)

    model.freeze("reward")
    trainer = build_dpo_trainer(model, _pref_rows(), _pref_rows(4), 0, DPOConfig(beta=0.5), LOOP, OPTIM,
                                tmp_path / "dpo")
    before = _snapshot(trainer.params)
    metrics = trainer.fit()
    assert torch.isfinite(torch.tensor(metrics["eval/loss"])) and _changed(before, trainer.params)
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert (len(quantized) > 0) == (quantization == "nf4")
