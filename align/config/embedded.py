"""Sizes of the embedded task (its generated splits) and of its tiny base (architecture, pretraining budget).

Plain dataclasses with no heavy imports, so the run config (``model.embedded``, ``data.embedded``) uses them
directly; ``align.data.synthetic`` generates the splits and ``align.models.embedded`` builds the base from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EmbeddedTaskConfig:
    """Sizes of the generated splits; ``bt_temperature`` is the Bradley-Terry label noise of the preference pairs:
    P(a preferred over b) = sigmoid((score_a - score_b) / bt_temperature); 0 gives noise-free labels."""

    seed: int = 0
    n_pretrain: int = 30000
    n_pretrain_eval: int = 1000
    n_sft: int = 3000
    n_preferences: int = 20000
    n_preferences_eval: int = 500
    n_prompts: int = 2000
    n_eval_prompts: int = 1000
    bt_temperature: float = 0.1

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if key != "bt_temperature" and (not isinstance(value, int) or value < 0):
                raise ValueError(f"task.{key}={value!r}: expected a non-negative integer")
        if self.bt_temperature < 0:
            raise ValueError(f"task.bt_temperature={self.bt_temperature!r}: expected >= 0 (0 = noise-free labels)")


@dataclass(frozen=True)
class EmbeddedBaseConfig:
    """Architecture and pretraining budget of the tiny base (defaults: ~0.9M parameters, about 2 minutes on
    2 CPU cores). ``block_size`` is the packed pretraining sequence length."""

    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 384
    num_heads: int = 4
    num_kv_heads: int = 2
    steps: int = 700
    batch_size: int = 16
    block_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 40
    seed: int = 0
