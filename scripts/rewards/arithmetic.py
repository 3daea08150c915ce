"""Reward functions for the chat arithmetic task (``python -m align.data.chat_task``), to pass as
``trainer.grpo.reward=scripts/rewards/arithmetic.py:correct`` (any ``file.py:function`` works the same way).

A reward function takes the prompts and the sampled responses (lists of strings) and returns one float per
response; columns of the prompts file that the function names as keyword arguments (here ``answer``) are passed as
lists aligned with the prompts.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+")


def correct(prompts: list[str], responses: list[str], answer: list[str]) -> list[float]:
    """1 when the response's first number is the reference answer, else 0; minus 0.02 per word past 12 (an answer
    buried in a long reply counts less)."""
    rewards = []
    for response, expected in zip(responses, answer):
        found = NUMBER.search(response)
        hit = 1.0 if found and found.group() == str(expected).strip() else 0.0
        rewards.append(hit - 0.02 * max(0, len(response.split()) - 12))
    return rewards
