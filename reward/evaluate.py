"""Evaluation of policies against a reward function: mean scores and paired win-rates."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Comparison:
    mean_a: float
    mean_b: float
    win_rate: float  # P(a beats b) on paired samples, ties count half
    n: int

    def __str__(self) -> str:
        return f"mean {self.mean_a:+.3f} vs {self.mean_b:+.3f}, win-rate {self.win_rate:.1%} (n={self.n})"


def win_rate(scores_a: torch.Tensor, scores_b: torch.Tensor) -> float:
    """Share of pairs where a scores above b, ties counting half: scores (N,) each, paired by index."""
    if scores_a.shape != scores_b.shape or scores_a.numel() == 0:
        raise ValueError(f"need two equal-length non-empty score lists, got {tuple(scores_a.shape)} and "
                         f"{tuple(scores_b.shape)}")
    return ((scores_a > scores_b).float() + 0.5 * (scores_a == scores_b).float()).mean().item()


def compare(scores_a: torch.Tensor, scores_b: torch.Tensor) -> Comparison:
    return Comparison(scores_a.mean().item(), scores_b.mean().item(), win_rate(scores_a, scores_b),
                      scores_a.numel())
