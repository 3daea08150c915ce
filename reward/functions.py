"""Reward functions: anything that scores (prompt, response) text pairs.

Trainers accept any ``RewardFn`` (a callable from lists of prompts and responses to a (B,) float tensor) and do
not care whether it is a learned reward model, a rule or the embedded task's hidden ground-truth scorer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from align.data.synthetic import score as ground_truth_score


class RewardFn(Protocol):
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Rewards, shape (B,), float32, one per (prompt, response) pair."""
        ...


class GroundTruthReward:
    """The embedded review world's hidden scorer (see ``align.data.synthetic.scorer``). Prompts are ignored: the
    score is a property of the continuation."""

    name = "ground_truth"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        return torch.tensor([ground_truth_score(r) for r in responses], dtype=torch.float32)


REWARD_FUNCTIONS: dict[str, Callable[[], RewardFn]] = {"ground_truth": GroundTruthReward}


def get_reward_function(name: str) -> RewardFn:
    try:
        return REWARD_FUNCTIONS[name]()
    except KeyError:
        raise ValueError(f"unknown reward function {name!r}; available: {sorted(REWARD_FUNCTIONS)}") from None
