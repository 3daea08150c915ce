"""A few DPO / SFT steps on a tiny Llama with LoRA, the same in a test process and in each rank of ``run_dpo.py``.

Everything is seeded: every rank builds the same model, adapters and data, and the back-end decides who sees which
rows. The SFT adapter is random (``init_lora_weights=False``) so the policy copied from it gets gradients in both
LoRA matrices from the first step.
"""

from __future__ import annotations

import datasets
import torch

from align.adapters import AdapterModel, LoraConfig
from align.config.methods import DPOConfig, SFTConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.models.quantize import quantize_linear_layers
from align.models.tiny import tiny_llama
from align.trainers.dpo import build_dpo_trainer
from align.trainers.sft import build_sft_trainer

PAD = 0
OPTIM = OptimizerConfig(lr=5e-3, schedule="cosine", warmup_steps=1, max_grad_norm=1.0, weight_decay=0.01)
DPO = DPOConfig(beta=0.5, policy="policy", reference="sft")
SFT = SFTConfig(adapter="sft")


def tiny_model(quantization: str = "none") -> AdapterModel:
    """The tiny Llama with a random 'sft' adapter; ``quantization`` 'nf4' or 'int8' quantizes its linear layers (the
    frozen base of QLoRA)."""
    base = tiny_llama(seed=0)
    if quantization != "none":
        base = quantize_linear_layers(base, quantization)
    model = AdapterModel(base)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model.add_adapter("sft", LoraConfig(r=4, init_lora_weights=False))
    return model


def _tokens(gen: torch.Generator, low: int, high: int) -> list[int]:
    length = int(torch.randint(low, high, (1,), generator=gen))
    return torch.randint(3, 128, (length,), generator=gen).tolist()


def preference_rows(n: int = 16, seed: int = 0) -> datasets.Dataset:
    gen = torch.Generator().manual_seed(seed)
    rows = [{"prompt_ids": _tokens(gen, 3, 8), "chosen_ids": _tokens(gen, 2, 7), "rejected_ids": _tokens(gen, 2, 7)}
            for _ in range(n)]
    return datasets.Dataset.from_list(rows)


def sft_rows(n: int = 16, seed: int = 0) -> datasets.Dataset:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt, response = _tokens(gen, 3, 8), _tokens(gen, 2, 8)
        rows.append({"input_ids": prompt + response, "response_mask": [False] * len(prompt) + [True] * len(response)})
    return datasets.Dataset.from_list(rows)


def loop_config(steps: int, micro_batch_size: int, grad_accum_steps: int, deepspeed: str | None = None,
                save_every: int = 0) -> LoopConfig:
    return LoopConfig(max_steps=steps, micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                      save_every=save_every, keep_checkpoints=5, progress=False, deepspeed=deepspeed)


def dpo_trainer(model: AdapterModel, loop: LoopConfig, out_dir):
    return build_dpo_trainer(model, preference_rows(), None, PAD, DPO, loop, OPTIM, out_dir)


def sft_trainer(model: AdapterModel, loop: LoopConfig, out_dir):
    return build_sft_trainer(model, sft_rows(), None, PAD, SFT, loop, OPTIM, out_dir)


def run(trainer, stop_at: int | None = None) -> list[dict[str, float]]:
    """Like ``trainer.fit`` without evaluation or checkpoints, stopping after step ``stop_at`` (default: the last):
    the metrics of every step."""
    trainer.resume()
    trainer._train_mode(True)
    history = []
    while trainer.step < (stop_at or trainer.cfg.max_steps):
        history.append(trainer.train_step())
    return history
