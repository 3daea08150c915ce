"""The run directory's ``manifest.json``: one record per stage, written atomically after every change.

A stage record::

    {"status": "pending|running|done|failed",
     "config_hash": "...",            # hash of the stage's config and of the upstream stages' hashes
     "config": {...},                 # the part of the config the stage depends on
     "inputs": {"sft/adapter": "sha256:..."},   # artifacts read (relative to the run dir, or absolute), hashed
     "artifacts": {"adapter": "dpo/adapter"},   # what the stage produced, relative to the run dir
     "metrics": {...}, "started": ..., "finished": ..., "seconds": ..., "attempts": n,
     "base": {"path": ..., "fingerprint": ...}, "reused_from": null, "error": null}
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
VERSION = 1


def config_hash(config: Any, upstream: list[str] | tuple[str, ...] = ()) -> str:
    blob = json.dumps({"config": config, "upstream": list(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def hash_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (names and contents, sorted); checkpoints are skipped."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                   and "checkpoints" not in p.relative_to(path).parts)
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


@dataclass
class Manifest:
    """The stages of one run. ``save()`` after each change; ``load`` reads what a previous run left."""

    run_dir: Path
    pipeline: str = ""
    stages: dict[str, dict] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / MANIFEST

    @classmethod
    def load(cls, run_dir: str | Path) -> Manifest:
        path = Path(run_dir) / MANIFEST
        if not path.is_file():
            return cls(Path(run_dir))
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"{path} is not valid JSON ({exc}); move it away to start the run afresh") from None
        return cls(Path(run_dir), data.get("pipeline", ""), data.get("stages", {}))

    def save(self) -> None:
        write_json_atomic(self.path, {"version": VERSION, "pipeline": self.pipeline, "updated": now(),
                                      "stages": self.stages})

    def record(self, stage: str) -> dict:
        return self.stages.setdefault(stage, {"status": "pending"})

    def update(self, stage: str, **values: Any) -> None:
        self.record(stage).update(values)
        self.save()

    def is_done(self, stage: str, digest: str) -> bool:
        rec = self.stages.get(stage, {})
        return rec.get("status") == "done" and rec.get("config_hash") == digest and all(
            (Path(self.run_dir) / p).exists() for p in rec.get("artifacts", {}).values() if isinstance(p, str))

    def artifact(self, stage: str, name: str) -> Path:
        """An artifact of a finished stage as a path (relative ones are read from the run dir)."""
        rec = self.stages.get(stage)
        if rec is None or rec.get("status") != "done":
            raise FileNotFoundError(f"stage {stage!r} of {self.run_dir} has not finished "
                                    f"(status: {rec.get('status') if rec else 'never run'})")
        try:
            value = rec["artifacts"][name]
        except KeyError:
            raise FileNotFoundError(f"stage {stage!r} of {self.run_dir} has no artifact {name!r} "
                                    f"(it has {sorted(rec.get('artifacts', {}))})") from None
        path = Path(value)
        return path if path.is_absolute() else Path(self.run_dir) / path


def base_dirs(run_dir: str | Path) -> tuple[Path, Path | None]:
    """The model directory (model + tokenizer) of a run's base and its task data directory (None for real data)."""
    manifest = Manifest.load(run_dir)
    model = manifest.artifact("base", "model_dir")
    data = manifest.stages["base"]["artifacts"].get("data_dir")
    return model, (Path(data) if data else None)


def stage_adapter(run_dir: str | Path, stage: str) -> Path:
    """The PEFT-format adapter directory a finished stage saved (``sft``, ``rm``, ``dpo``, ``ppo``, ...)."""
    return Manifest.load(run_dir).artifact(stage, "adapter")
