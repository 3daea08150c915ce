"""The embedded task: a seeded synthetic review world with a hidden ground-truth scorer, its tokenizer and splits.

It is the default when no model or data is given, so alignment can be measured offline on a laptop CPU: the
scorer says how positive a continuation is, the base distribution writes both positive and negative ones, and
alignment should move the score up. See docs/data.md, "The embedded task".
"""

from .scorer import score, score_breakdown
from .splits import WORLD_VERSION, EmbeddedTaskConfig, generate_splits, write_splits
from .tokenizer import build_tokenizer, save_tokenizer
from .world import ReviewWorld

__all__ = [
    "WORLD_VERSION", "EmbeddedTaskConfig", "ReviewWorld", "build_tokenizer", "generate_splits", "save_tokenizer",
    "score", "score_breakdown", "write_splits",
]
