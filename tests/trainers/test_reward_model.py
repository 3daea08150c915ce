"""Reward model: the head travels with its adapter (save + reload give the same rewards and statistics), the
statistics are the mean/std of the rewards by hand, and a toy task is learned to > 0.9 held-out accuracy."""

import json

import datasets
import pytest
import torch

from align.config.methods import RewardConfig
from align.data import PreferenceCollator
from align.models.heads import HEAD_CONFIG, ScalarHead
from align.trainers.reward_model import (
    build_reward_trainer,
    fit_statistics,
    new_reward_head,
    pairwise_accuracy,
    reward_loss,
    sequence_rewards,
)

from .helpers import PAD, build_trainer, loop_config, lora_model, optim_config, preference_rows

COLLATE = PreferenceCollator(PAD)


def test_reward_loss_by_hand():
    """Bradley-Terry per pair: -log sigmoid(r_chosen - r_rejected) = log(1 + exp(-(r_c - r_r))), summed;
    rewards read at the last real token of each (right-padded) sequence."""
    model = lora_model("reward", init=False)
    head = new_reward_head(model)
    batch = COLLATE(preference_rows(3, seed=2))
    loss_sum, metrics = reward_loss(model, head, batch, RewardConfig())
    with model.use("reward"):
        hidden = model.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    last = batch["attention_mask"].sum(1) - 1
    rewards = torch.stack([head(hidden.last_hidden_state[i, last[i]]) for i in range(6)])
    chosen, rejected = rewards[:3], rewards[3:]
    expected = sum(torch.log1p(torch.exp(-(c - r))) for c, r in zip(chosen, rejected))
    torch.testing.assert_close(loss_sum, expected)
    assert metrics["accuracy"] == pytest.approx((chosen > rejected).float().mean().item())


def test_head_is_saved_beside_adapter_and_reloaded(tmp_path):
    trainer = build_trainer("reward", tmp_path / "run", loop={"max_steps": 4})
    trainer.fit()
    model, head = trainer.modules
    cfg = RewardConfig(stats_rows=4)
    rows = preference_rows(12, seed=0)
    fit_statistics(model, head, rows, COLLATE, cfg)
    # by hand: mean / unbiased std of the 8 rewards (4 chosen, 4 rejected) of the first stats_rows pairs
    first = sequence_rewards(model, head, COLLATE(rows[:4]), "reward").float()
    assert head.mean.item() == pytest.approx(first.mean().item(), abs=1e-6)
    assert head.std.item() == pytest.approx(first.std().item(), abs=1e-6)
    assert head.std.item() > 0
    stats = (head.mean.item(), head.std.item())
    fit_statistics(model, head, datasets.Dataset.from_list(rows), COLLATE, cfg)  # a Dataset: the same 4 pairs
    assert (head.mean.item(), head.std.item()) == pytest.approx(stats, abs=1e-6)

    out = tmp_path / "reward_model"
    model.save_adapter("reward", out)
    head.save(out)
    assert json.loads((out / HEAD_CONFIG).read_text())["mean"] == pytest.approx(head.mean.item())

    fresh = lora_model(adapter=None)  # a new base object, no adapter yet
    fresh.load_adapter(out, "reward")
    loaded = ScalarHead.load(out)
    batch = COLLATE(preference_rows(5, seed=9))
    expected = sequence_rewards(model, head, batch, "reward")
    torch.testing.assert_close(sequence_rewards(fresh, loaded, batch, "reward"), expected, rtol=0, atol=1e-6)
    assert (loaded.mean.item(), loaded.std.item()) == (head.mean.item(), head.std.item())
    torch.testing.assert_close(loaded.normalize(expected), head.normalize(expected))


def test_load_without_head_fails_clearly(tmp_path):
    lora_model("reward").save_adapter("reward", tmp_path)
    with pytest.raises(FileNotFoundError, match="must be saved with its head"):
        ScalarHead.load(tmp_path)


def test_reward_model_learns_marker_task(tmp_path):
    """Chosen responses contain token 7 somewhere, rejected ones never; same lengths. Held-out accuracy starts
    near chance (measured 0.45) and exceeds 0.9 after 30 steps of 16 pairs (measured 1.0)."""
    model = lora_model("reward", r=8)
    head = new_reward_head(model)
    train_set, eval_set = preference_rows(256, seed=0), preference_rows(64, seed=1)
    cfg = RewardConfig()
    before = pairwise_accuracy(model, head, eval_set, COLLATE, cfg)["accuracy"]
    loop = loop_config(max_steps=30, micro_batch_size=16)
    trainer = build_reward_trainer(model, head, train_set, eval_set, PAD, cfg, loop, optim_config(lr=1e-2),
                                   tmp_path)
    metrics = trainer.fit()
    assert 0.3 < before < 0.7
    assert metrics["eval/accuracy"] > 0.9
    assert metrics["eval/margin"] > 1.0
