"""Rollouts: batched sampling from the policy adapter, laid out for scoring and training.

Generation runs with the policy adapter active, in eval mode and without gradients, through Hugging Face
``generate`` (KV cache, temperature / top-p, stop at EOS) on left-padded prompts. Each sampled row is then re-laid
out right-padded, ``prompt + response``, exactly as the reward model saw preference pairs in training, so every
role scores the same tensors with plain positions:

    input_ids       (B, T)  prompt tokens, then response tokens (through the first EOS), then padding
    attention_mask  (B, T)  1 = a real token
    response_mask   (B, T)  True = a generated token, up to and including the first EOS
    finished        (B,)    True = the response produced EOS within ``max_new_tokens``

Sampling draws from the global torch RNG, which checkpoints save and restore, so a resumed run samples what an
uninterrupted one would. The RL loop passes a ``seed`` instead: each generation batch is then sampled from an RNG
seeded by ``(seed, its index in the global batch)``, so a run samples the same responses whether the global batch is
generated in one process or split over data-parallel ranks (as long as ``generation_batch_size`` divides every
rank's share), and the global RNG is left untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from align.adapters import AdapterModel
from align.config.rl import RolloutConfig
from align.data.collate import pad
from align.models.device import device_of


@dataclass
class Rollout:
    """A batch of sampled responses; see the module docstring for the tensors. ``prompt_ids`` /
    ``response_ids`` are the token lists (the response through EOS); texts are filled by ``decode``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    prompts: list[str] | None = None
    responses: list[str] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)  # (B,)

    def batch(self, rows: torch.Tensor | slice | None = None) -> dict[str, torch.Tensor]:
        """The model inputs of ``rows`` (all by default), trimmed to their longest sequence."""
        rows = slice(None) if rows is None else rows
        mask = self.attention_mask[rows]
        width = int(mask.sum(dim=1).max()) if mask.numel() else 0
        return {"input_ids": self.input_ids[rows, :width], "attention_mask": mask[:, :width],
                "response_mask": self.response_mask[rows, :width]}

    def to(self, device: torch.device) -> Rollout:
        """The rollout with its tensors on ``device`` (where the model scores it)."""
        for name in ("input_ids", "attention_mask", "response_mask", "finished"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def decode(self, tokenizer) -> None:
        """Prompt and response texts without special tokens (for reward functions that read text)."""
        self.prompts = tokenizer.batch_decode(self.prompt_ids, skip_special_tokens=True)
        self.responses = tokenizer.batch_decode(self.response_ids, skip_special_tokens=True)


def split_responses(generated: torch.Tensor, eos_token_id: int) -> tuple[list[list[int]], torch.Tensor]:
    """Cut each generated row after its first EOS. generated (B, N) (what ``generate`` appended to the prompts);
    returns (responses, finished): the token lists through the first EOS (the whole row when there is none) and
    (B,) True where EOS occurred. Padding ``generate`` adds after EOS is dropped even when pad == EOS."""
    is_eos = generated == eos_token_id  # (B, N)
    finished = is_eos.any(dim=1)
    ends = torch.where(finished, is_eos.int().argmax(dim=1) + 1, generated.shape[1])  # (B,) response lengths
    return [row[:end].tolist() for row, end in zip(generated, ends.tolist())], finished


def layout(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_token_id: int,
           finished: torch.Tensor) -> Rollout:
    """Right-padded ``prompt + response`` rows with their masks (see the module docstring)."""
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    masks = [[False] * len(p) + [True] * len(r) for p, r in zip(prompt_ids, response_ids)]
    return Rollout(input_ids=pad(rows, pad_token_id), attention_mask=pad([[1] * len(r) for r in rows], 0),
                   response_mask=pad(masks, 0, dtype=torch.bool), finished=finished,
                   prompt_ids=[list(p) for p in prompt_ids], response_ids=[list(r) for r in response_ids])


def chunk_seed(seed: int, chunk: int) -> int:
    """The RNG seed of generation batch ``chunk`` of a rollout seeded ``seed`` (a 63-bit mix of the two)."""
    return (seed * 1_000_003 + chunk * 7_919 + 17) % (2**63 - 1)


@torch.no_grad()
def generate_rollout(model: AdapterModel, adapter: str | None, prompt_ids: Sequence[Sequence[int]],
                     cfg: RolloutConfig, eos_token_id: int, pad_token_id: int, seed: int | None = None,
                     first_chunk: int = 0, synced: bool = False) -> Rollout:
    """Sample one response per prompt (repeat a prompt for several samples) with ``adapter`` active, in eval mode,
    ``cfg.generation_batch_size`` prompts at a time. The model's train/eval mode is restored.

    ``seed``: sample generation batch i from an RNG seeded ``chunk_seed(seed, first_chunk + i)`` (``first_chunk``:
    the index of this call's first batch in the global batch) rather than from the global RNG. ``synced``: the
    ranks of a ZeRO-3 run each generate until all have finished (every forward gathers parameters collectively)."""
    was_training = model.training
    model.eval()
    responses: list[list[int]] = []
    finished: list[torch.Tensor] = []
    device = device_of(model)
    try:
        with model.use(adapter):
            for i, start in enumerate(range(0, len(prompt_ids), cfg.generation_batch_size)):
                chunk = prompt_ids[start:start + cfg.generation_batch_size]
                ids = pad(chunk, pad_token_id, left=True)  # (b, P): every prompt ends at the last column
                mask = pad([[1] * len(p) for p in chunk], 0, left=True)
                with _sampling_rng(seed, first_chunk + i, device):
                    out = model.generate(
                        input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                        temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id, **({"synced_gpus": True} if synced else {}))
                rows, done = split_responses(out[:, ids.shape[1]:], eos_token_id)
                responses += rows
                finished.append(done)
    finally:
        model.train(was_training)
    return layout(prompt_ids, responses, pad_token_id, torch.cat(finished).cpu()).to(device)


@contextmanager
def _sampling_rng(seed: int | None, chunk: int, device: torch.device):
    """The global RNG (``seed`` None), or a forked one seeded for ``chunk``: restored afterwards."""
    if seed is None:
        yield
        return
    forked = {"devices": [device], "device_type": "cuda"} if device.type == "cuda" else {"devices": []}
    with torch.random.fork_rng(**forked):
        torch.manual_seed(chunk_seed(seed, chunk))
        yield


def apply_unfinished_penalty(scores: torch.Tensor, finished: torch.Tensor, penalty: float) -> torch.Tensor:
    """``scores - penalty`` where the response never produced EOS. scores, finished (B,); returns (B,)."""
    return scores - penalty * (~finished.bool()).to(scores.dtype)
