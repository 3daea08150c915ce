"""What a stage gets: the typed config, its directory, the finished upstream stages' artifacts, and helpers to
load the one frozen base with the adapters of earlier stages switched in as roles."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.config.build import as_dict
from align.config.run import RunConfig, adapter_config
from align.durable import replace_dir_durable

from .manifest import Manifest

# the adapter name each stage's output takes when a later stage loads it (its role)
ROLE_OF_STAGE = {"sft": "sft", "rm": "reward", "dpo": "policy", "ppo": "policy", "grpo": "policy",
                 "rloo": "policy"}


@dataclass
class StageResult:
    """``artifacts``: name -> path relative to the run dir; ``inputs``: what was read -> content hash."""

    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)


@dataclass
class StageContext:
    stage: str
    cfg: RunConfig
    run_dir: Path
    manifest: Manifest
    device: str | None = None  # where load_model put the base

    @property
    def dir(self) -> Path:
        return self.run_dir / self.stage

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, self.run_dir)

    # ---------------------------------------------------------------------------------------------- inputs
    def base_dirs(self) -> tuple[Path, Path | None]:
        rec = self.manifest.stages["base"]["artifacts"]
        return Path(rec["model_dir"]), (Path(rec["data_dir"]) if rec.get("data_dir") else None)

    def data_path(self, key: str, embedded_file: str) -> str:
        """``data.<key>``, or the embedded task's file of that kind."""
        value = getattr(self.cfg.data, key)
        if value is not None:
            return value
        _, data_dir = self.base_dirs()
        return str(data_dir / embedded_file)

    def upstream(self, stage: str) -> bool:
        stages = self.cfg.pipeline.stages
        return stage in stages and stages.index(stage) < stages.index(self.stage)

    def load_model(self, adapters: tuple[str, ...] = ()):
        """The frozen base (quantized as configured) as an ``AdapterModel``, with the adapters of the finished
        ``adapters`` stages loaded frozen under their role names, and the tokenizer."""
        import torch

        from align.adapters import AdapterModel
        from align.models.device import resolve_device
        from align.models.loading import load_base

        model_dir, _ = self.base_dirs()
        dtype = torch.bfloat16 if self.cfg.model.dtype == "bf16" else torch.float32
        device = resolve_device(self.cfg.model.device)
        if distributed() and device.type == "cuda":  # one GPU per DeepSpeed rank
            device = torch.device("cuda", torch.cuda.current_device())
        base, tok = load_base(model_dir, quantization=self.cfg.model.quantization, dtype=dtype, device=device,
                              attn_implementation=self.cfg.model.attn_implementation)
        self.device = str(device)
        model = AdapterModel(base)
        for stage in adapters:
            model.load_adapter(self.manifest.artifact(stage, "adapter"), ROLE_OF_STAGE[stage])
        return model, tok

    def adapter_config(self, stage: str | None = None):
        key = f"trainer.{stage}.adapter" if stage and self.cfg.trainer[stage].adapter else "adapter"
        return adapter_config(self.cfg.adapter_settings(stage or self.stage), key)

    # ---------------------------------------------------------------------------------------------- outputs
    def tracker(self):
        from align.tracking import Tracker

        flat = flatten(self.cfg.raw)
        wandb = self.cfg.tracking.wandb if rank() == 0 else "off"  # one W&B run per stage, from rank 0
        return Tracker(self.dir, name=f"{self.run_name}-{self.stage}", config=flat, wandb=wandb,
                       project=self.cfg.tracking.project, group=self.cfg.tracking.group or self.run_name,
                       job_type=self.stage)

    @property
    def run_name(self) -> str:
        return self.cfg.run.name or self.run_dir.name

    def save_adapter_atomic(self, model, name: str, head=None, subdir: str = "adapter") -> str:
        """Write adapter ``name`` (and a head beside it) to ``<stage>/<subdir>`` (``subdir`` may be nested, e.g.
        ``round-2/adapter``) through a temporary directory beside it,
        so a crash never leaves a half-written adapter where a later stage would read it (one writer: the run
        directory's lock, ``pipelines.lock``, keeps a second run out). With several ranks
        (DeepSpeed workers) every rank calls this: the weights are gathered from their shards, rank 0 writes;
        likewise after DeepSpeed on one rank, where ZeRO-3 partitions too."""
        final = self.dir / subdir
        tmp = final.parent / f".{final.name}.tmp"  # same directory: the final rename never crosses a mount
        final.parent.mkdir(parents=True, exist_ok=True)
        stage = self.cfg.trainer.get(self.stage)
        # ZeRO-3 partitions the weights even on one rank: gather whenever the stage trained through DeepSpeed
        sharded = distributed() or (stage is not None and stage.loop.deepspeed is not None)
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if sharded:
            import deepspeed

            from align.distributed.deepspeed import save_adapter_gathered

            save_adapter_gathered(model, name, tmp)
            gathered = deepspeed.zero.GatheredParameters(list(head.parameters()) if head is not None else [],
                                                         modifier_rank=None)
        else:
            model.save_adapter(name, tmp)
            gathered = contextlib.nullcontext()
        if head is not None:
            with gathered:
                if rank() == 0:
                    head.save(tmp)
        if rank() == 0:  # flushed, then swapped in: a crash leaves the old adapter or the new one
            replace_dir_durable(tmp, final)
        barrier()
        return self.rel(final)

    def loop(self, stage: str | None = None):
        loop = self.cfg.trainer[stage or self.stage].loop
        if loop.deepspeed is not None:
            from dataclasses import replace

            loop = replace(loop, deepspeed=str(resolve_deepspeed(loop.deepspeed)))
        return loop


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if distributed():
        import torch.distributed as dist

        dist.barrier()


def resolve_deepspeed(path: str) -> Path:
    """A DeepSpeed JSON path as given, or relative to the repository's ``configs/deepspeed/``."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate.resolve()
    from align.config.compose import config_dir

    shipped = config_dir() / "deepspeed" / path
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"deepspeed.config={path}: no such file (looked in . and {shipped.parent})")


def flatten(mapping: Any, prefix: str = "") -> dict[str, Any]:
    """{'trainer': {'dpo': {'beta': 0.1}}} -> {'trainer.dpo.beta': 0.1} (W&B sweeps and tables want flat keys)."""
    out: dict[str, Any] = {}
    for key, value in (as_dict(mapping) or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
