"""A training stage on a group of Ray Train workers running the DeepSpeed back-end (``resources.num_workers > 1``
with a ``deepspeed=`` option).

Ray Train starts ``num_workers`` worker processes (``resources.num_cpus`` CPUs each, or one GPU each with
``resources.num_gpus``), forms the torch process group (gloo on CPU, NCCL on GPUs) and sets RANK / WORLD_SIZE /
MASTER_ADDR; every worker then runs the same stage function, whose loop trains through DeepSpeed (ZeRO shards the
optimizer state, and with ZeRO-3 the parameters, across the workers; each rank reads its own slice of every
batch). Rank 0 writes the artifacts (adapters gathered from the shards first) and hands the stage's result back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RESULT_FILE = ".worker_result.json"


def _worker(config: dict) -> None:
    import torch.distributed as dist

    if not config["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from .stages import execute_stage

    result = execute_stage(config["stage"], config["cfg"], config["run_dir"], config["threads"])
    if not dist.is_initialized() or dist.get_rank() == 0:
        path = Path(config["run_dir"]) / config["stage"] / RESULT_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, default=str))
        os.replace(tmp, path)


def run_with_workers(stage: str, cfg, run_dir: Path, cpus: int) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpus = cfg.resources.num_gpus
    use_gpu = (gpus or 0) > 0 or (gpus is None and ray.cluster_resources().get("GPU", 0) >= cfg.resources.num_workers)
    per_worker = {"CPU": cfg.resources.num_cpus or 1}
    result_path = Path(run_dir) / stage / RESULT_FILE
    result_path.unlink(missing_ok=True)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"stage": stage, "cfg": cfg, "run_dir": str(run_dir), "use_gpu": use_gpu,
                           "threads": cfg.resources.num_cpus or 1},
        scaling_config=ScalingConfig(num_workers=cfg.resources.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"{stage}-workers", storage_path=str((Path(run_dir) / stage / "ray_train").resolve())),
    )
    trainer.fit()
    if not result_path.is_file():
        raise RuntimeError(f"the {stage!r} workers finished without a result ({result_path} is missing)")
    return json.loads(result_path.read_text())
