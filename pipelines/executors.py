"""Where a stage runs: a Ray task with the stage's declared resources (the default), or this process.

The Ray executor connects to ``ray.address`` / ``RAY_ADDRESS`` when given (a cluster, or the cluster a
``ray job submit`` entrypoint runs on) and otherwise starts a local Ray sized for the machine, with its own temp
dir, bound to 127.0.0.1. A stage whose worker process dies is retried ``resources.max_retries`` times by Ray; the
retry resumes from the stage's checkpoints. Every process of the job (stage tasks, Ray Train workers, Tune trials)
gets the offline defaults of the entry point (``align.offline``) through the job's runtime environment.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol

from align.config.run import TRAINING_STAGES, RunConfig

from .stages import execute_stage


class Executor(Protocol):
    def run(self, stage: str, cfg: RunConfig, run_dir: Path) -> dict: ...

    def close(self) -> None: ...


class InlineExecutor:
    """Stages run in this process, one after another (``ray.enabled=false``; sweep trials)."""

    def run(self, stage: str, cfg: RunConfig, run_dir: Path) -> dict:
        return execute_stage(stage, cfg, str(run_dir), cfg.resources.num_cpus)

    def close(self) -> None:
        pass


def _ray_temp_dir(run_dir: Path) -> str:
    # short: Ray's socket paths must stay under the 107-character limit of AF_UNIX
    tag = hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]
    return os.path.join(tempfile.gettempdir(), f"align-ray-{tag}")


def start_ray(cfg: RunConfig, run_dir: Path) -> bool:
    """Connect to ``ray.address`` / ``RAY_ADDRESS``, or start a local Ray sized for the machine on 127.0.0.1 with
    a temp dir of ``run_dir``'s own. False when Ray was running in this process already (the caller then leaves
    it running)."""
    import ray

    from align.offline import worker_env

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # the workers of a cluster do not inherit this process's environment: hand them the offline defaults
    env = {"runtime_env": {"env_vars": worker_env()}} if worker_env() else {}
    if address:
        ray.init(address=address, log_to_driver=True, **env)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or os.cpu_count(), include_dashboard=False,
                 _temp_dir=_ray_temp_dir(Path(run_dir).resolve()), _node_ip_address="127.0.0.1",
                 log_to_driver=True, configure_logging=False, **env)
    return True


class RayExecutor:
    def __init__(self, cfg: RunConfig) -> None:
        import ray

        self.ray = ray
        self.started = start_ray(cfg, Path(cfg.run_dir))
        self.remote = ray.remote(execute_stage)

    def _cpus(self, cfg: RunConfig) -> int:
        if cfg.resources.num_cpus:
            return cfg.resources.num_cpus
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        return int(max((n["Resources"].get("CPU", 1) for n in nodes), default=1))

    def _gpus(self, cfg: RunConfig) -> float:
        if cfg.resources.num_gpus is not None:
            return cfg.resources.num_gpus
        return 1.0 if self.ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def run(self, stage: str, cfg: RunConfig, run_dir: Path) -> dict:
        cpus = self._cpus(cfg)
        options = {"num_cpus": cpus, "num_gpus": self._gpus(cfg), "max_retries": cfg.resources.max_retries,
                   "retry_exceptions": False, "name": f"align:{stage}"}
        if cfg.resources.memory_gb:
            options["memory"] = int(cfg.resources.memory_gb * 2**30)
        if cfg.resources.num_workers > 1 and stage in TRAINING_STAGES:
            from .train_workers import run_with_workers

            return run_with_workers(stage, cfg, run_dir, cpus)
        ref = self.remote.options(**options).remote(stage, cfg, str(run_dir), cpus)
        return self.ray.get(ref)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(cfg: RunConfig) -> Executor:
    return RayExecutor(cfg) if cfg.ray.enabled else InlineExecutor()
