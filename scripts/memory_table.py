"""The "Memory per rank" tables of docs/pipelines.md, from ``align.models.memory`` (regenerate with this script).

Each training stage is composed from the shipped configs (``pipeline=<stage>`` and the overrides below, validated
as ``python -m align.run`` validates them), then predicted for a model shape given here instead of the embedded
base: the roles, micro-batch and DeepSpeed settings are the config's. A cell is the device total per rank, with
what ZeRO offloads to the host after a '+'; '-' where the config refuses the combination (ZeRO-3 with a quantized
base).

    python scripts/memory_table.py            # prints the markdown tables
"""

from __future__ import annotations

import functools

from align.config.compose import compose_run_config
from align.config.errors import ConfigError
from align.models.memory import GiB, ModelShape, predict
from align.models.memory_plan import stage_roles, stage_setup, stage_workload

SHAPES = {
    "7B-shaped Llama (hidden 4096, 32 layers, intermediate 11008, 32 heads, 32 kv heads, vocab 32000)": ModelShape(
        vocab_size=32000, hidden_size=4096, num_layers=32, intermediate_size=11008, num_heads=32, num_kv_heads=32,
        head_dim=128, tie_word_embeddings=False),
    "SmolLM2-135M (hidden 576, 30 layers, intermediate 1536, 9 heads, 3 kv heads, vocab 49152, tied)": ModelShape(
        vocab_size=49152, hidden_size=576, num_layers=30, intermediate_size=1536, num_heads=9, num_kv_heads=3,
        head_dim=64, tie_word_embeddings=True),
}
WORKLOAD = ["data.max_length=512", "data.max_prompt_length=256", "adapter.r=16",
            "trainer.sft.micro_batch_size=2", "trainer.rm.micro_batch_size=2", "trainer.dpo.micro_batch_size=2",
            *[f"trainer.{s}.{k}" for s in ("ppo", "grpo") for k in ("minibatch_size=4", "rollout.max_new_tokens=256",
                                                                    "rollout.generation_batch_size=64")]]
STAGES = {"sft": "sft", "rm": "rm", "dpo": "dpo", "ppo": "ppo", "grpo": "grpo"}  # stage: pipeline
BASES = {"fp32": ["model.dtype=fp32"], "bf16": ["model.dtype=bf16"],
         "NF4 (bf16 compute)": ["model.dtype=bf16", "model.quantization=nf4"]}
COLUMNS = [("none", 1), ("zero2", 1), ("zero2", 2), ("zero2_offload", 1), ("zero2_offload", 2), ("zero3", 1),
           ("zero3", 2)]


@functools.cache
def config(stage: str, base: str, deepspeed: str = "none", ranks: int = 1):
    """The run config of this cell (None where validation refuses it); composed once for both shapes."""
    overrides = [f"pipeline={STAGES[stage]}", *WORKLOAD, *BASES[base], f"deepspeed={deepspeed}",
                 f"resources.num_workers={ranks}"]
    try:
        return compose_run_config(overrides)
    except ConfigError:
        return None


def cell(stage: str, shape: ModelShape, base: str, deepspeed: str, ranks: int) -> str:
    cfg = config(stage, base, deepspeed, ranks)
    if cfg is None:
        return "-"
    m = predict(stage, shape, stage_roles(cfg, stage), stage_workload(cfg, stage), stage_setup(cfg, stage))
    text = f"{m.total / GiB:.2f}"
    return text + (f" + {m.host / GiB:.2f} host" if m.host else "")


def table(shape: ModelShape) -> list[str]:
    head = ["stage", "base"] + [f"{'plain' if d == 'none' else d} x{n}" for d, n in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage in STAGES:
        for name in BASES:
            cells = [cell(stage, shape, name, d, n) for d, n in COLUMNS]
            lines.append(f"| {stage} | {name} | " + " | ".join(cells) + " |")
    return lines


def breakdown(shape: ModelShape) -> list[str]:
    """The parts of each stage, plain PyTorch on one rank, bf16 base."""
    lines = ["| stage | base | adapters (+ heads) | grads | optimizer | activations | KV cache |",
             "|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        cfg = config(stage, "bf16")
        m = predict(stage, shape, stage_roles(cfg, stage), stage_workload(cfg, stage), stage_setup(cfg, stage))
        parts = [m.base, m.adapters + m.heads, m.grads, m.optimizer, m.activations, m.kv_cache]
        lines.append(f"| {stage} | " + " | ".join(f"{p / GiB:.2f}" for p in parts) + " |")
    return lines


def main() -> None:
    print("Workload: " + " ".join(WORKLOAD) + "\n")
    for title, shape in SHAPES.items():
        print(f"{title}, GiB per rank:\n")
        print("\n".join(table(shape)) + "\n")
        print("Parts, bf16 base, plain PyTorch, 1 rank (GiB):\n")
        print("\n".join(breakdown(shape)) + "\n")


if __name__ == "__main__":
    main()
