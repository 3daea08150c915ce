"""Small heads on the shared base: the reward model's scalar score head and the value model's per-token head.

A head is saved beside its adapter (``head.safetensors`` + ``head.json``) and always reloaded with it, together
with the reward normalisation statistics measured after training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"


class ScalarHead(nn.Module):
    """Linear(H -> 1) with normalisation statistics: ``normalize(r) = (r - mean) / std``.
    kind: 'score' (one value per sequence, read at the last token) or 'value' (one per token)."""

    def __init__(self, hidden_size: int, kind: str = "score", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if kind not in ("score", "value"):
            raise ValueError(f"head kind must be 'score' or 'value', got {kind!r}")
        self.kind = kind
        self.proj = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.proj.bias)
        self.register_buffer("mean", torch.zeros((), dtype=torch.float32))
        self.register_buffer("std", torch.ones((), dtype=torch.float32))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (...)."""
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1)

    def normalize(self, rewards: torch.Tensor) -> torch.Tensor:
        return (rewards - self.mean) / self.std.clamp(min=1e-6)

    def set_statistics(self, rewards: torch.Tensor) -> None:
        self.mean.fill_(rewards.float().mean().item())
        self.std.fill_(rewards.float().std().item() if rewards.numel() > 1 else 1.0)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(directory / HEAD_WEIGHTS))
        meta = {"kind": self.kind, "hidden_size": self.proj.in_features, "mean": self.mean.item(),
                "std": self.std.item()}
        (directory / HEAD_CONFIG).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path, dtype: torch.dtype = torch.float32) -> ScalarHead:
        directory = Path(directory)
        if not (directory / HEAD_CONFIG).is_file():
            raise FileNotFoundError(f"{directory} has no {HEAD_CONFIG}: a reward/value adapter must be saved with its "
                                    "head (ScalarHead.save)")
        meta = json.loads((directory / HEAD_CONFIG).read_text())
        head = cls(meta["hidden_size"], meta["kind"], dtype=dtype)
        head.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)))
        return head
