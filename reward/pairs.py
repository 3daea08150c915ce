"""Preference pairs sampled from a policy and labelled by a reward function (the DPO paper's IMDb protocol:
continuations from the SFT model, ranked by a scorer standing in for human labellers).

For each prompt, ``k`` responses are sampled from the policy adapter; the best and the worst under the reward
function (or, with ``score_ids``, a scorer of the sampled token ids: the learned reward model) become (chosen,
rejected). Prompts whose samples all tie, or whose best or worst response is empty, give no pair. Pairs drawn
from the policy's own distribution teach DPO far more than pairs from another distribution.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from align.adapters import AdapterModel
from align.models.generate import prompt_text, sample_ids

from .functions import RewardFn

# (prompt ids, response ids) -> scores (N,): each sequence is prompt_ids[i] + response_ids[i]
ScoreIds = Callable[[list[list[int]], list[list[int]]], torch.Tensor]


def sample_preference_pairs(model: AdapterModel, adapter: str | None, tokenizer, prompts: Sequence[str],
                            reward_fn: RewardFn | None, k: int = 4, max_new_tokens: int = 64,
                            temperature: float = 1.0, seed: int = 0, score_ids: ScoreIds | None = None) -> list[dict]:
    """Rows {prompt, chosen, rejected, chosen_score, rejected_score} (best and worst of ``k`` samples). A prompt is
    a string or a conversation (a list of messages); for a conversation chosen/rejected are assistant turns.

    The samples are ranked by ``reward_fn`` (prompt words and response texts) or by ``score_ids`` (the sampled
    token ids themselves, so a reward model scores exactly the tokens the policy generated): exactly one of them."""
    if k < 2:
        raise ValueError(f"k={k}: need at least two samples per prompt to form a pair")
    if (reward_fn is None) == (score_ids is None):
        raise ValueError("rank the samples by reward_fn or by score_ids: exactly one of them")
    drawn = [sample_ids(model, adapter, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        seed=seed + i) for i in range(k)]
    texts = [prompt_text(p) for p in prompts]  # reward functions see words, not message lists
    scores = [(score_ids(s.prompt_ids, s.response_ids) if score_ids is not None else reward_fn(texts, s.texts))
              .tolist() for s in drawn]
    samples = [s.texts for s in drawn]
    rows = []
    for i, prompt in enumerate(prompts):
        ranked = sorted(((scores[j][i], samples[j][i]) for j in range(k)), key=lambda pair: pair[0])
        (low, worst), (high, best) = ranked[0], ranked[-1]
        if high == low or not best.strip() or not worst.strip() or best.strip() == worst.strip():
            continue
        if not isinstance(prompt, str):  # a conversation's pair is written as assistant turns
            prompt, best, worst = list(prompt), _assistant(best), _assistant(worst)
        rows.append({"prompt": prompt, "chosen": best, "rejected": worst, "chosen_score": high,
                     "rejected_score": low})
    return rows


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    from align.durable import write_text_durable

    path = Path(path)
    write_text_durable(path, "".join(json.dumps(row) + "\n" for row in rows))  # unique temp name, fsynced
    return path
