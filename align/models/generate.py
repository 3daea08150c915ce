"""Sampling responses from a role (an adapter of the shared base) for evaluation and rollouts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from align.adapters import AdapterModel

from .device import device_of


def as_messages(prompt) -> list[dict]:
    """A prompt as chat messages: a string is one user turn, a conversation (list/tuple of messages) stays."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def prompt_text(prompt) -> str:
    """The words of a prompt for reward functions and reports: a string as it is, a conversation's last user turn."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else str(prompt[-1]["content"])


def encode_prompts(tokenizer, prompts: Sequence) -> list[list[int]]:
    """Prompt ids through the chat template (the conversation + generation prompt) when the tokenizer has one.
    A prompt is a string (one user turn) or a conversation (a list of {role, content} messages)."""
    if tokenizer.chat_template:
        return [tokenizer.apply_chat_template(as_messages(p), tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"] for p in prompts]
    if any(not isinstance(p, str) for p in prompts):
        raise ValueError("conversational prompts need a tokenizer with a chat template (tokenizer.chat_template)")
    return [tokenizer(p).input_ids for p in prompts]


@dataclass
class Samples:
    """One sampled response per prompt. ``prompt_ids``: what the model was given (``encode_prompts``);
    ``response_ids``: the generated tokens through the first EOS (all of them when there is none), so
    ``prompt_ids[i] + response_ids[i]`` is the sequence a reward model scores, laid out as the RL rollouts lay it out;
    ``texts``: the responses decoded without special tokens."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]


def sample(model: AdapterModel, adapter: str | None, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64,
           temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64, seed: int = 0) -> list[str]:
    """One sampled response per prompt from ``adapter`` (None: the bare base), decoded without special tokens.
    Sampling stops at EOS; the global RNG is left untouched."""
    return sample_ids(model, adapter, tokenizer, prompts, max_new_tokens, temperature, top_p, batch_size, seed).texts


@torch.no_grad()
def sample_ids(model: AdapterModel, adapter: str | None, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64,
               temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64, seed: int = 0) -> Samples:
    """``sample`` with the token ids kept: the prompts' and the responses' (see ``Samples``)."""
    was_training = model.training
    model.eval()
    prompt_ids = encode_prompts(tokenizer, prompts)
    texts: list[str] = []
    response_ids: list[list[int]] = []
    with torch.random.fork_rng(), model.use(adapter):
        torch.manual_seed(seed)
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start:start + batch_size]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):  # left padding: every prompt ends at the last column
                ids[row, width - len(seq):] = torch.tensor(seq)
                mask[row, width - len(seq):] = 1
            device = device_of(model)
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=temperature > 0, temperature=max(temperature, 1e-5),
                top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
            texts += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            response_ids += [_through_eos(row, tokenizer.eos_token_id) for row in generated[:, width:].tolist()]
    model.train(was_training)
    return Samples([list(p) for p in prompt_ids], response_ids, texts)


def _through_eos(row: list[int], eos_token_id: int) -> list[int]:
    """A generated row cut after its first EOS (``generate`` pads finished rows, with EOS when pad == EOS)."""
    return row[:row.index(eos_token_id) + 1] if eos_token_id in row else row
