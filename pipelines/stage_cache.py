"""Finished stages shared between runs, keyed by stage identity (``<stage>-<digest>``).

Sweep trials that share upstream stages (the base and SFT of a DPO beta sweep) run them once: the first run
publishes the finished stage directory here (without checkpoints), later runs with the same identity copy it in.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

RECORD = "stage.json"


class StageCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def path(self, stage: str, digest: str) -> Path:
        return self.root / f"{stage}-{digest}"

    def record(self, stage: str, digest: str) -> dict:
        return json.loads((self.path(stage, digest) / RECORD).read_text())

    def restore(self, stage: str, digest: str, run_dir: Path) -> bool:
        """Copy a cached stage into ``run_dir``; False when the cache does not hold it."""
        entry = self.path(stage, digest)
        if not (entry / RECORD).is_file():
            return False
        target = Path(run_dir) / stage
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(entry / "files", target)
        return True

    def publish(self, stage: str, digest: str, run_dir: Path, record: dict) -> None:
        entry = self.path(stage, digest)
        if (entry / RECORD).is_file():
            return
        tmp = self.root / f".{entry.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        source = Path(run_dir) / stage
        if source.exists():
            shutil.copytree(source, tmp / "files", ignore=shutil.ignore_patterns("checkpoints", "wandb", ".*"))
        else:
            (tmp / "files").mkdir(parents=True)
        (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str))
        try:
            os.replace(tmp, entry)
        except OSError:  # another run published it first
            shutil.rmtree(tmp, ignore_errors=True)
