"""Tiny RL set-ups shared by the PPO / GRPO / RLOO tests: a tiny Llama with a random 'sft' adapter, a 'reward'
adapter + score head, a toy tokenizer and a toy text reward (plain functions, no fixtures)."""

from __future__ import annotations

import torch

from align.adapters import AdapterModel, LoraConfig
from align.config.rl import KLConfig, RLConfig, RolloutConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.models import quantize_linear_layers, tiny_llama
from align.models.heads import ScalarHead
from align.trainers.grpo import build_grpo_trainer
from align.trainers.ppo import build_ppo_trainer
from align.trainers.rloo import build_rloo_trainer

PAD, BOS, EOS, MARKER = 0, 1, 2, 7
BUILDERS = {"ppo": build_ppo_trainer, "grpo": build_grpo_trainer, "rloo": build_rloo_trainer}


class ToyTokenizer:
    """Decodes ids to space-separated numbers; special tokens dropped when asked."""

    pad_token_id, bos_token_id, eos_token_id = PAD, BOS, EOS

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        special = {PAD, BOS, EOS} if skip_special_tokens else set()
        return [" ".join(str(t) for t in row if t not in special) for row in rows]


class MarkerReward:
    """A text reward: the share of response tokens that are MARKER."""

    def __call__(self, prompts, responses) -> torch.Tensor:
        return torch.tensor([r.split().count(str(MARKER)) / max(len(r.split()), 1) for r in responses])


def prompt_rows(n: int, seed: int = 0, length: int = 4, vocab: int = 128) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": [BOS, *torch.randint(3, vocab, (length,), generator=gen).tolist()]} for _ in range(n)]


def rl_model(quantization: str = "none", vocab_size: int = 128, hidden_size: int = 32,
             intermediate_size: int = 64) -> tuple[AdapterModel, ScalarHead]:
    """A tiny Llama with a random (init=False) 'sft' adapter and a 'reward' adapter + score head, seeded, so two
    calls build identical objects."""
    base = tiny_llama(seed=0, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size)
    if quantization != "none":
        base = quantize_linear_layers(base, quantization)
    model = AdapterModel(base)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model.add_adapter("sft", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), trainable=False)
        model.add_adapter("reward", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), trainable=False)
        head = ScalarHead(model.config.hidden_size, "score")
    return model, head


def rl_config(algo: str = "ppo", **overrides) -> RLConfig:
    rollout = RolloutConfig(**{"prompts_per_step": 4, "group_size": 1 if algo == "ppo" else 2,
                               "max_new_tokens": 6, **overrides.pop("rollout", {})})
    kl = KLConfig(**overrides.pop("kl", {}))
    return RLConfig(**{"algo": algo, "rollout": rollout, "kl": kl, "ppo_epochs": 2, "minibatch_size": 2,
                       **overrides})


def build_rl(algo: str, out_dir, reward: str = "model", quantization: str = "none", max_steps: int = 4,
             save_every: int = 0, cfg: RLConfig | None = None, model=None, deepspeed: str | None = None,
             prompts: int = 12, vocab_size: int = 128, **cfg_overrides):
    """Fresh model objects (rebuilt from the same seeds, as after a kill) and an RL trainer for ``algo`` with a
    learned reward ('model') or MarkerReward ('function'), on ``prompts`` prompt rows of tokens below ``vocab_size``
    (the model's vocabulary), through the DeepSpeed
    back-end when ``deepspeed`` names its JSON config."""
    if model is None:
        model, head = rl_model(quantization, vocab_size=vocab_size)
    else:
        model, head = model
    if reward == "function":
        cfg_overrides.setdefault("reward_adapter", None)
        if algo == "ppo":
            cfg_overrides.setdefault("value_init", "fresh")
    cfg = cfg or rl_config(algo, **cfg_overrides)
    loop = LoopConfig(max_steps=max_steps, save_every=save_every, progress=False, deepspeed=deepspeed)
    optim = OptimizerConfig(lr=1e-2, schedule="cosine", warmup_steps=1, weight_decay=0.01)
    kwargs = {"reward_head": head} if reward == "model" else {"reward_fn": MarkerReward()}
    return BUILDERS[algo](model, prompt_rows(prompts, vocab=vocab_size), ToyTokenizer(), cfg, loop, optim, out_dir,
                          adapter_config=LoraConfig(r=4, lora_alpha=8), **kwargs)
