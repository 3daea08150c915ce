"""Run tracking: a JSONL metrics file always, W&B when asked (offline unless a key or online mode is set)."""

from .tracker import Tracker, wandb_mode

__all__ = ["Tracker", "wandb_mode"]
