"""One rank of a multi-rank DeepSpeed DPO run, launched by test_deepspeed_multirank.py:

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \\
        --master_port PORT tests/distributed/run_dpo.py DS_CONFIG OUT_DIR [QUANTIZATION]

``OUT_DIR/straight``: ``STEPS`` steps in one go, its checkpoint and the adapter saved with ``save_adapter_gathered``;
``OUT_DIR/resumed``: ``STEPS - 1`` steps and a checkpoint, then a fresh model and engine that resume and finish
with ``fit``. ``OUT_DIR/rank<r>.json``: that rank's per-step metrics and what the engine looked like.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from align.distributed.deepspeed import save_adapter_gathered  # noqa: E402
from tests.distributed.tiny_dpo import dpo_trainer, loop_config, run, tiny_model  # noqa: E402

STEPS, MICRO_BATCH, ACCUM = 3, 2, 2


def main(ds_config: str, out: Path, quantization: str = "none") -> None:
    torch.manual_seed(0)
    model = tiny_model(quantization)
    trainer = dpo_trainer(model, loop_config(STEPS, MICRO_BATCH, ACCUM, ds_config), out / "straight")
    history = run(trainer)
    trainer.save()
    save_adapter_gathered(model, "policy", out / "straight" / "adapter")
    backend = trainer.backend
    report = {
        "history": history, "world_size": backend.world_size, "zero_stage": backend.zero_stage,
        "optimizer": type(backend.engine.basic_optimizer).__name__,
        "partitioned": all(p.numel() == 0 for p in trainer.params.values()),  # ZeRO-3 keeps shards only
    }

    resumed = out / "resumed"  # interrupted after step STEPS - 1, then a new model and engine resume from disk
    torch.manual_seed(0)
    trainer = dpo_trainer(tiny_model(quantization), loop_config(STEPS, MICRO_BATCH, ACCUM, ds_config), resumed)
    run(trainer, stop_at=STEPS - 1)
    trainer.save()
    torch.manual_seed(1)  # the checkpoint restores the RNG states
    model = tiny_model(quantization)
    dpo_trainer(model, loop_config(STEPS, MICRO_BATCH, ACCUM, ds_config), resumed).fit()
    save_adapter_gathered(model, "policy", resumed / "adapter")
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:4])
