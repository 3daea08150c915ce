"""GRPO and RLOO advantages are wired correctly on a hand-made group, PPO's token rewards and GAE on a hand-made
rollout, and GRPO / RLOO train the policy only (no value role)."""

import math

import pytest
import torch

from align.algos import whiten
from align.config.rl import KLConfig
from align.trainers.grpo import group_advantages
from align.trainers.ppo import ppo_advantages, token_rewards
from align.trainers.rl_common import Experience
from align.trainers.rloo import leave_one_out_advantages
from align.trainers.rollout import layout

from .rl_helpers import build_rl, rl_config

LENGTHS = [1, 2, 3, 3, 2, 1]  # response tokens of the 2 prompts x 3 samples


def _experience(rewards, kl_sums=None) -> Experience:
    """6 responses (2 prompts x k=3, samples of a prompt adjacent) with LENGTHS tokens, the given sequence rewards,
    and per-token KL putting ``kl_sums[i]`` on the first token of response i."""
    mask = torch.tensor([[j < n for j in range(3)] for n in LENGTHS])  # (6, 3)
    kl = torch.zeros(6, 3)
    kl[:, 0] = torch.tensor(kl_sums or [0.0] * 6)
    zeros = torch.zeros(6, 3)
    return Experience(rollout=None, mask=mask, old_logps=zeros, ref_logps=zeros, entropy=zeros, values=None,
                      scores=torch.tensor(rewards), rewards=torch.tensor(rewards), kl=kl)


def _broadcast(per_response) -> torch.Tensor:
    return torch.tensor([[per_response[i] if j < n else 0.0 for j in range(3)] for i, n in enumerate(LENGTHS)])


def test_grpo_advantages_on_a_hand_made_group():
    """Rewards [1, 2, 3 | 0, 0, 3]. Group 1: mean 2, std 1 -> (-1, 0, 1) / (1 + 1e-4). Group 2: mean 1,
    std sqrt((1 + 1 + 4) / 2) = sqrt(3) -> (-1, -1, 2) / (sqrt(3) + 1e-4). KL in the loss: rewards untouched."""
    exp = _experience([1.0, 2.0, 3.0, 0.0, 0.0, 3.0], kl_sums=[5.0] * 6)
    group_advantages(exp, kl_coef=0.5, cfg=rl_config("grpo", rollout={"group_size": 3}, kl={"in_loss": True}))
    s = math.sqrt(3) + 1e-4
    expected = _broadcast([-1 / 1.0001, 0.0, 1 / 1.0001, -1 / s, -1 / s, 2 / s])
    torch.testing.assert_close(exp.advantages, expected)


def test_grpo_kl_in_the_reward():
    """KL sums [0, 0, 2 | 0, 0, 0] at coef 0.5 turn rewards [1, 2, 3 | 0, 0, 3] into [1, 2, 2 | 0, 0, 3].
    Group 1: mean 5/3, deviations (-2/3, 1/3, 1/3), std sqrt((4/9 + 1/9 + 1/9) / 2) = 1/sqrt(3)."""
    exp = _experience([1.0, 2.0, 3.0, 0.0, 0.0, 3.0], kl_sums=[0.0, 0.0, 2.0, 0.0, 0.0, 0.0])
    group_advantages(exp, kl_coef=0.5, cfg=rl_config("grpo", rollout={"group_size": 3}))
    s1, s2 = 1 / math.sqrt(3) + 1e-4, math.sqrt(3) + 1e-4
    expected = _broadcast([-2 / 3 / s1, 1 / 3 / s1, 1 / 3 / s1, -1 / s2, -1 / s2, 2 / s2])
    torch.testing.assert_close(exp.advantages, expected)


def test_rloo_advantages_on_a_hand_made_group():
    """r_i minus the mean of the other two: [1 - 2.5, 2 - 2, 3 - 1.5 | 0 - 1.5, 0 - 1.5, 3 - 0]."""
    exp = _experience([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
    leave_one_out_advantages(exp, kl_coef=0.0, cfg=rl_config("rloo", rollout={"group_size": 3}, whiten_advantages=False))
    expected = _broadcast([-1.5, 0.0, 1.5, -1.5, -1.5, 3.0])
    torch.testing.assert_close(exp.advantages, expected)
    leave_one_out_advantages(exp, kl_coef=0.0, cfg=rl_config("rloo", rollout={"group_size": 3}))  # whitened over the 12 response tokens
    torch.testing.assert_close(exp.advantages, whiten(expected, exp.mask))


def _ppo_experience() -> Experience:
    """Prompt [1, 5]; responses [7, 8, 2] (3 tokens) and [2] (1 token): shifted positions 1-3 and 1."""
    rollout = layout([[1, 5], [1, 5]], [[7, 8, 2], [2]], 0, torch.tensor([True, True]))
    mask = rollout.response_mask[:, 1:]  # (2, 4)
    kl = torch.where(mask, torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 4.0, 0.0, 0.0]]), 0.0)
    values = torch.where(mask, torch.tensor([[0.0, 0.5, 0.25, 0.125], [0.0, -1.0, 0.0, 0.0]]), 0.0)
    zeros = torch.zeros(2, 4)
    return Experience(rollout=rollout, mask=mask, old_logps=zeros, ref_logps=zeros, entropy=zeros, values=values,
                      scores=torch.tensor([1.0, -2.0]), rewards=torch.tensor([1.0, -2.0]), kl=kl)


def test_ppo_token_rewards_and_gae_by_hand():
    """coef 0.1: row 0 gets [-, -0.1, -0.2, -0.3 + 1], row 1 [-, -0.4 - 2]. With gamma = lambda = 1 the returns are
    the rewards-to-go: row 0 [-, 0.4, 0.5, 0.7], row 1 [-, -2.4], and advantages = returns - values."""
    exp = _ppo_experience()
    cfg = rl_config("ppo", gamma=1.0, lam=1.0, whiten_advantages=False)
    rewards = token_rewards(exp, 0.1, cfg)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.1, -0.2, 0.7], [0.0, -2.4, 0.0, 0.0]]))
    ppo_advantages(exp, 0.1, cfg)
    returns = torch.tensor([[0.0, 0.4, 0.5, 0.7], [0.0, -2.4, 0.0, 0.0]])
    torch.testing.assert_close(exp.returns, returns)
    torch.testing.assert_close(exp.advantages, returns - exp.values)
    in_loss = rl_config("ppo", kl=KLConfig(in_loss=True).__dict__)
    torch.testing.assert_close(token_rewards(exp, 0.1, in_loss),
                               torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, -2.0, 0.0, 0.0]]))


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
@pytest.mark.parametrize("reward", ["model", "function"])
def test_critic_free_runs_train_only_the_policy(algo, reward, tmp_path):
    trainer = build_rl(algo, tmp_path, reward=reward, max_steps=2)
    assert "value" not in trainer.model.adapter_names and trainer.value_head is None
    assert set(trainer.roles) == ({"policy", "reference", "reward"} if reward == "model" else {"policy", "reference"})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.fit()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".adapters.policy." in k}
    assert math.isfinite(metrics["loss/policy"]) and "loss/value" not in metrics
    assert trainer.prompts.position == 2 and 0 < metrics["rollout/response_length"] <= 6
