"""Pure tensor math for alignment: token and sequence log-probs (chunked over the vocabulary), masked reductions,
Bradley-Terry and the DPO family, and the PPO / GRPO / RLOO pieces (KL estimators, whitening, GAE, clipped losses,
group advantages, KL controllers, running moments).

No model, no I/O; imports only torch.
"""

from .control import AdaptiveKLController, FixedKLController, RunningMoments
from .logprobs import (
    IGNORE_INDEX,
    chunked_token_logps,
    chunked_token_logps_and_entropy,
    masked_mean,
    masked_sum,
    sequence_logps,
    token_logps,
)
from .preference import (
    DPO_LOSSES,
    bradley_terry_loss,
    cdpo_loss,
    dpo_implicit_rewards,
    dpo_sigmoid_loss,
    get_dpo_loss,
    hinge_loss,
    ipo_loss,
    robust_dpo_loss,
    simpo_loss,
)
from .rl import (
    KL_ESTIMATORS,
    entropy_from_logits,
    explained_variance,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    whiten,
)

__all__ = [
    "DPO_LOSSES", "IGNORE_INDEX", "KL_ESTIMATORS", "AdaptiveKLController", "FixedKLController", "RunningMoments",
    "bradley_terry_loss", "cdpo_loss", "chunked_token_logps", "chunked_token_logps_and_entropy",
    "dpo_implicit_rewards", "dpo_sigmoid_loss",
    "entropy_from_logits", "explained_variance", "gae", "get_dpo_loss", "grpo_advantages", "hinge_loss", "ipo_loss",
    "kl_penalty", "masked_mean", "masked_sum", "masked_var", "ppo_policy_loss", "ppo_value_loss", "rloo_advantages",
    "robust_dpo_loss", "sequence_logps", "simpo_loss", "token_logps", "whiten",
]
