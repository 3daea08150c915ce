"""PPO with four roles on one frozen base (Ouyang et al. 2022; Ziegler et al. 2019): the policy adapter (a
trainable copy of the SFT adapter), the frozen reference (the SFT adapter, or the bare base), the reward (the frozen
reward adapter + score head, or any reward function) and the value adapter + per-token value head (trainable,
started from the reward adapter and head by default).

What is PPO's own: the value role and GAE advantages over per-token rewards (-kl_coef x KL on every response token,
plus the sequence reward on its last token). Rollout, scoring and the clipped update are in ``rl_common.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from align.adapters import AdapterModel, LoraConfig
from align.algos import gae, whiten
from align.config.errors import ConfigError
from align.config.rl import RLConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.models.device import device_of
from align.models.heads import ScalarHead
from align.models.roles import VALUE, Role

from .rl_common import Experience, Reduce, RewardFn
from .rl_loop import RLTrainer, build_rl_trainer, setup_roles


def token_rewards(exp: Experience, kl_coef: float, cfg: RLConfig) -> torch.Tensor:
    """(B, T-1): -kl_coef x the per-token KL estimate (unless the KL is in the loss), plus the sequence reward on
    each response's last token."""
    rewards = torch.zeros_like(exp.old_logps) if cfg.kl.in_loss else -kl_coef * exp.kl
    last = exp.rollout.attention_mask.sum(dim=1) - 2  # (B,): the last token's position in the shifted layout
    rewards[torch.arange(len(exp), device=rewards.device), last] += exp.rewards
    return rewards


def ppo_advantages(exp: Experience, kl_coef: float, cfg: RLConfig, reduce: Reduce | None = None) -> None:
    """GAE(gamma, lambda) advantages over the token rewards with the rollout's values; returns = A + V are the
    value targets; advantages whitened over the batch's response tokens when ``cfg.whiten_advantages`` (over every
    data-parallel rank's with ``reduce``)."""
    advantages, returns = gae(token_rewards(exp, kl_coef, cfg), exp.values, exp.mask, cfg.gamma, cfg.lam)
    exp.advantages = whiten(advantages, exp.mask, reduce=reduce) if cfg.whiten_advantages else advantages
    exp.returns = returns


def setup_value(model: AdapterModel, cfg: RLConfig, reward_head: ScalarHead | None,
                adapter_config: LoraConfig | None = None) -> tuple[Role, ScalarHead]:
    """The value role: adapter ``cfg.value`` and a per-token head, copied from the reward adapter and its score
    head (``value_init='reward'``, as InstructGPT) or fresh. An existing value adapter is kept."""
    head = ScalarHead(model.config.hidden_size, "value", dtype=model.adapter_dtype).to(device_of(model))
    if cfg.value_init == "reward":
        if cfg.reward_adapter is None or reward_head is None:
            raise ConfigError("trainer.rl.value_init", cfg.value_init, "'fresh' when there is no reward model")
        head.load_state_dict(reward_head.state_dict())
    if cfg.value not in model.adapter_names:
        if cfg.value_init == "reward":
            model.copy_adapter(cfg.reward_adapter, cfg.value)
        else:
            model.add_adapter(cfg.value, adapter_config or LoraConfig())
    return Role(VALUE, cfg.value, "value", True), head


def build_ppo_trainer(model: AdapterModel, prompt_rows, tokenizer, cfg: RLConfig, loop: LoopConfig,
                      optim: OptimizerConfig, out_dir: str | Path, reward_head: ScalarHead | None = None,
                      reward_fn: RewardFn | None = None, tracker=None,
                      adapter_config: LoraConfig | None = None) -> RLTrainer:
    """PPO on ``model``'s adapters. ``prompt_rows``: rows with ``prompt_ids`` (``align.data.prepare_prompts``).
    The reward is ``cfg.reward_adapter`` + ``reward_head`` or ``reward_fn`` (then ``cfg.reward_adapter=None``).
    ``adapter_config`` is used for adapters created fresh (a policy without reference, a fresh value)."""
    if cfg.algo != "ppo":
        raise ConfigError("trainer.rl.algo", cfg.algo, "'ppo' for build_ppo_trainer")
    roles = setup_roles(model, cfg, reward_head, reward_fn, adapter_config)
    roles[VALUE], value_head = setup_value(model, cfg, reward_head, adapter_config)
    return build_rl_trainer(model, roles, ppo_advantages, prompt_rows, tokenizer, cfg, loop, optim, out_dir,
                            value_head=value_head, reward_head=reward_head, reward_fn=reward_fn, tracker=tracker)
