"""RLOO (Ahmadian et al. 2024, arXiv:2402.14740): no value model; k samples per prompt, each response's baseline
is the mean reward of the other k - 1, its advantage is on every one of its tokens. As in the paper the reward is
the score minus kl_coef x the response's summed KL (or the KL goes into the loss). Rollout, scoring and the clipped
update are shared with PPO (``rl_common.py``)."""

from __future__ import annotations

from pathlib import Path

from align.adapters import AdapterModel, LoraConfig
from align.algos import rloo_advantages, whiten
from align.config.errors import ConfigError
from align.config.rl import RLConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.models.heads import ScalarHead

from .rl_common import Experience, Reduce, RewardFn, broadcast, penalised_sequence_rewards
from .rl_loop import RLTrainer, build_rl_trainer, setup_roles


def leave_one_out_advantages(exp: Experience, kl_coef: float, cfg: RLConfig, reduce: Reduce | None = None) -> None:
    """r_i - mean_{j != i} r_j within each prompt's group, broadcast over the response's tokens, whitened over the
    batch's response tokens (every data-parallel rank's with ``reduce``) when ``cfg.whiten_advantages``."""
    rewards = penalised_sequence_rewards(exp, kl_coef, cfg)
    advantages = broadcast(rloo_advantages(rewards, cfg.rollout.group_size), exp.mask)
    exp.advantages = whiten(advantages, exp.mask, reduce=reduce) if cfg.whiten_advantages else advantages


def build_rloo_trainer(model: AdapterModel, prompt_rows, tokenizer, cfg: RLConfig, loop: LoopConfig,
                       optim: OptimizerConfig, out_dir: str | Path, reward_head: ScalarHead | None = None,
                       reward_fn: RewardFn | None = None, tracker=None,
                       adapter_config: LoraConfig | None = None) -> RLTrainer:
    """RLOO on ``model``'s adapters; arguments as ``build_ppo_trainer`` (no value role)."""
    if cfg.algo != "rloo":
        raise ConfigError("trainer.rl.algo", cfg.algo, "'rloo' for build_rloo_trainer")
    roles = setup_roles(model, cfg, reward_head, reward_fn, adapter_config)
    return build_rl_trainer(model, roles, leave_one_out_advantages, prompt_rows, tokenizer, cfg, loop, optim,
                            out_dir, reward_head=reward_head, reward_fn=reward_fn, tracker=tracker)
