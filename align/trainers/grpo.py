"""GRPO (Shao et al. 2024, arXiv:2402.03300): no value model; k samples per prompt, each response's advantage is
its reward normalised within its group, on every one of its tokens. The KL to the reference goes into the loss
(``trainer.rl.kl.in_loss=true``, GRPO's choice, with the k3 estimator) or is subtracted from the reward. Rollout,
scoring and the clipped update are shared with PPO (``rl_common.py``)."""

from __future__ import annotations

from pathlib import Path

from align.adapters import AdapterModel, LoraConfig
from align.algos import grpo_advantages
from align.config.errors import ConfigError
from align.config.rl import RLConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.models.heads import ScalarHead

from .rl_common import Experience, Reduce, RewardFn, broadcast, penalised_sequence_rewards
from .rl_loop import RLTrainer, build_rl_trainer, setup_roles


def group_advantages(exp: Experience, kl_coef: float, cfg: RLConfig, reduce: Reduce | None = None) -> None:
    """(r_i - mean_g) / (std_g + eps) over the k samples of each prompt, broadcast over the response's tokens. A
    prompt's k samples are always on one rank, so no statistic crosses ranks (``reduce`` is not needed)."""
    rewards = penalised_sequence_rewards(exp, kl_coef, cfg)
    exp.advantages = broadcast(grpo_advantages(rewards, cfg.rollout.group_size), exp.mask)


def build_grpo_trainer(model: AdapterModel, prompt_rows, tokenizer, cfg: RLConfig, loop: LoopConfig,
                       optim: OptimizerConfig, out_dir: str | Path, reward_head: ScalarHead | None = None,
                       reward_fn: RewardFn | None = None, tracker=None,
                       adapter_config: LoraConfig | None = None) -> RLTrainer:
    """GRPO on ``model``'s adapters; arguments as ``build_ppo_trainer`` (no value role)."""
    if cfg.algo != "grpo":
        raise ConfigError("trainer.rl.algo", cfg.algo, "'grpo' for build_grpo_trainer")
    roles = setup_roles(model, cfg, reward_head, reward_fn, adapter_config)
    return build_rl_trainer(model, roles, group_advantages, prompt_rows, tokenizer, cfg, loop, optim, out_dir,
                            reward_head=reward_head, reward_fn=reward_fn, tracker=tracker)
