"""Tiny models, toy datasets and configs shared by the trainer tests (plain functions, no fixtures)."""

from __future__ import annotations

import datasets
import torch

from align.adapters import AdapterModel, LoraConfig
from align.config.methods import DPOConfig, RewardConfig, SFTConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.models import tiny_llama
from align.trainers.dpo import build_dpo_trainer
from align.trainers.reward_model import build_reward_trainer, new_reward_head
from align.trainers.sft import build_sft_trainer

PAD, BOS, EOS = 0, 1, 2
MARKER = 7  # the token that makes a response "chosen" in the toy preference task


def lora_model(adapter: str | None = "sft", seed: int = 0, dropout: float = 0.0, init: bool | str = True,
               r: int = 4) -> AdapterModel:
    """tiny_llama (vocab 128) wrapped in an AdapterModel, with one LoRA adapter unless ``adapter`` is None.
    The adapter's init draws from a generator seeded by ``seed``, so two calls build identical models."""
    model = AdapterModel(tiny_llama(seed=seed))
    if adapter is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model.add_adapter(adapter, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                  init_lora_weights=init))
    return model


def loop_config(**overrides) -> LoopConfig:
    return LoopConfig(**{"max_steps": 3, "micro_batch_size": 2, "progress": False, **overrides})


def optim_config(**overrides) -> OptimizerConfig:
    return OptimizerConfig(**{"lr": 1e-2, "schedule": "constant", **overrides})


def sft_rows(n: int, seed: int = 0, prompt_len: int = 3,
             response_lens: tuple[int, ...] = (1, 2, 5, 8)) -> list[dict]:
    """Random SFT rows whose response lengths cycle through ``response_lens``."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(3, 128, (prompt_len,), generator=gen).tolist()
        response = torch.randint(3, 128, (response_lens[i % len(response_lens)],), generator=gen).tolist()
        mask = [False] * prompt_len + [True] * len(response)
        rows.append({"input_ids": prompt + response, "response_mask": mask})
    return rows


def copy_rows(n: int, seed: int, symbols: int = 8, length: int = 4) -> list[dict]:
    """A learnable SFT task: BOS, ``length`` tokens of a small alphabet, SEP, then the same tokens and EOS."""
    sep = 3
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        tokens = torch.randint(10, 10 + symbols, (length,), generator=gen).tolist()
        prompt, response = [BOS, *tokens, sep], [*tokens, EOS]
        mask = [False] * len(prompt) + [True] * len(response)
        rows.append({"input_ids": prompt + response, "response_mask": mask})
    return rows


def preference_rows(n: int, seed: int, length: int = 4) -> list[dict]:
    """A toy preference task: the chosen response holds MARKER at a random place, the rejected one does not.
    Both responses have ``length`` tokens, so length tells nothing."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(10, 128, (3,), generator=gen).tolist()
        chosen = torch.randint(10, 128, (length,), generator=gen).tolist()
        chosen[int(torch.randint(0, length, (1,), generator=gen))] = MARKER
        rejected = torch.randint(10, 128, (length,), generator=gen).tolist()
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return rows


def snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-identical: same names, torch.equal for each."""
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:2]}"


def build_trainer(method: str, out_dir, dropout: float = 0.0, loop: dict | None = None,
                  optim: dict | None = None):
    """A fresh model (rebuilt from the same seeds, as after a kill) and its trainer for ``method``:
    'sft', 'reward' (adapter + head) or 'dpo' (policy copied from a random 'sft' adapter, reference
    precomputed). Defaults: 10 steps of 2 x 2 rows, cosine schedule with warm-up 2, weight decay 0.01."""
    loop_cfg = loop_config(**{"max_steps": 10, "micro_batch_size": 2, "grad_accum_steps": 2, **(loop or {})})
    optim_cfg = optim_config(**{"schedule": "cosine", "warmup_steps": 2, "weight_decay": 0.01,
                                **(optim or {})})
    if method == "sft":
        model = lora_model("sft", dropout=dropout)
        return build_sft_trainer(model, sft_rows(12), None, PAD, SFTConfig(), loop_cfg, optim_cfg, out_dir)
    if method == "reward":
        model = lora_model("reward", dropout=dropout)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            head = new_reward_head(model)
        return build_reward_trainer(model, head, preference_rows(12, 0), None, PAD, RewardConfig(), loop_cfg,
                                    optim_cfg, out_dir)
    if method == "dpo":
        model = lora_model("sft", dropout=dropout, init=False)
        train_set = datasets.Dataset.from_list(preference_rows(12, 0))
        return build_dpo_trainer(model, train_set, None, PAD, DPOConfig(), loop_cfg, optim_cfg, out_dir)
    raise ValueError(method)
