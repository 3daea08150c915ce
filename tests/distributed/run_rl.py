"""One rank of a multi-rank DeepSpeed RL run (PPO, GRPO or RLOO), launched by test_rl_multirank.py:

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \\
        --master_port PORT tests/distributed/run_rl.py DS_CONFIG OUT_DIR ALGO QUANTIZATION [DIE_AT]

Runs ``STEPS`` iterations into ``OUT_DIR`` with a checkpoint after every one, resuming from the newest checkpoint
there. ``DIE_AT``: rank 0 kills itself with SIGKILL at the start of that iteration (torchrun then stops the other
rank), as a crashed node would. After the last iteration the policy (and PPO's value adapter and head) are saved
from the shards into ``OUT_DIR/adapter`` (``OUT_DIR/value``), and ``OUT_DIR/rank<r>.json`` holds that rank's
per-iteration metrics and what its engine looked like.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from align.distributed.deepspeed import save_adapter_gathered  # noqa: E402
from tests.distributed.tiny_rl import rl_trainer  # noqa: E402


def main(ds_config: str, out: Path, algo: str, quantization: str, die_at: int | None = None) -> None:
    torch.manual_seed(0)
    trainer = rl_trainer(algo, out, quantization, world_size=2, deepspeed=ds_config)
    rank = dist.get_rank()
    history: list[dict] = []
    iteration = trainer.iteration

    def recording():
        if die_at is not None and trainer.step + 1 == die_at and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        metrics = iteration()
        history.append(metrics)
        return metrics

    trainer.iteration = recording
    trainer.fit()
    save_adapter_gathered(trainer.model, "policy", out / "adapter")
    if trainer.value_head is not None:
        save_adapter_gathered(trainer.model, "value", out / "value")
    backend = trainer.driver
    report = {"history": history, "world_size": backend.world_size, "zero_stage": backend.zero_stage,
              "optimizer": type(backend.engine.basic_optimizer).__name__,
              "partitioned": all(p.numel() == 0 for p in trainer.params.values()),
              "prompts_seen": trainer.prompts.position}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    # leave together and close the group: a rank that exits while the other still talks to it (or with the group's
    # threads alive) sometimes aborted at exit ("terminate called without an active exception", SIGABRT)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4], *(int(a) for a in sys.argv[5:6]))
