"""A few RL iterations on the tiny Llama of ``tests/trainers/rl_helpers.py``, the same in a test process and in each
rank of ``run_rl.py``: a global batch of ``GLOBAL_PROMPTS`` prompts per iteration, split evenly over the ranks, one
minibatch per epoch (each rank's whole share), generation in batches of ``GEN_BATCH`` (which divides every rank's
share, so the seeded rollouts are the same on 1 or 2 ranks). A vocabulary of 16 makes EOS frequent: responses
end at different lengths, so the ranks hold different numbers of response tokens.

    ppo   the learned reward (adapter + head), value adapter and head from it, running reward normalisation,
          whitened GAE advantages, an adaptive KL controller
    grpo  the learned reward, group advantages, k3 KL in the loss
    rloo  the learned reward, running reward normalisation, whitened leave-one-out advantages

(The learned reward, not a text rule, in every case: on these random tokens a text rule scores every response
alike, the advantages are 0, and what is left to train on is fp32 noise that Adam blows up to lr-sized steps.)
"""

from __future__ import annotations

import torch

from tests.trainers.rl_helpers import build_rl

STEPS, GLOBAL_PROMPTS, GEN_BATCH, PROMPT_ROWS = 3, 4, 2, 16
SETTINGS = {
    "ppo": {"reward": "model", "normalize_rewards": True,
            "kl": {"adaptive": True, "target": 0.01, "horizon": 10.0}},
    "grpo": {"reward": "model", "kl": {"in_loss": True, "estimator": "k3"}},
    "rloo": {"reward": "model", "normalize_rewards": True},
}


def rl_trainer(algo: str, out_dir, quantization: str = "none", world_size: int = 1, deepspeed: str | None = None):
    """The trainer one of ``world_size`` ranks runs (``GLOBAL_PROMPTS / world_size`` prompts per iteration), with a
    checkpoint after every iteration."""
    options = dict(SETTINGS[algo])
    reward = options.pop("reward")
    k = 1 if algo == "ppo" else 2
    per_rank = GLOBAL_PROMPTS // world_size
    return build_rl(algo, out_dir, reward=reward, quantization=quantization, max_steps=STEPS, save_every=1,
                    deepspeed=deepspeed, prompts=PROMPT_ROWS, vocab_size=16, minibatch_size=per_rank * k, ppo_epochs=2,
                    rollout={"prompts_per_step": per_rank, "group_size": k, "generation_batch_size": GEN_BATCH,
                             "max_new_tokens": 6}, **options)


def assert_close_after_adam(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Two runs of the same RL iterations whose fp32 sums ran in another order (see test_rl_multirank.py for the
    measurements): the bulk of the weights within 2e-6 (median), none beyond 2e-4, where Adam turned a first gradient
    that is fp32 noise into an lr-sized step (2% of one step at lr = 1e-2)."""
    assert got.keys() == expected.keys()
    differences = torch.cat([(got[k].detach() - expected[k].detach()).abs().flatten() for k in expected])
    assert differences.median() < 2e-6 and differences.max() < 2e-4, (differences.median(), differences.max())
