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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.durable import write_text_durable

MANIFEST = "manifest.json"
VERSION = 1


def config_hash(config: Any, upstream: list[str] | tuple[str, ...] = ()) -> str:
    blob = json.dumps({"config": config, "upstream": list(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def hash_path(path: str | Path, cache: HashCache | None = None) -> str:
    """sha256 of a file's contents, or of a directory's files (relative names and their sha256, sorted);
    checkpoints are skipped. ``cache``: remembers each file's digest by size and modification time, so a large
    model is read once, and a ``touch`` or a copy without preserved times only costs a re-read, never a new
    identity."""
    path = Path(path)
    if path.is_file():
        return "sha256:" + (cache.file_digest(path) if cache else _file_digest(path))
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(path).parts):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        digest.update((cache.file_digest(file) if cache else _file_digest(file)).encode() + b"\n")
    return "sha256:" + digest.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class HashCache:
    """File digests keyed by (absolute path, size, mtime_ns, inode), kept in ``$ALIGN_CACHE/file-hashes.json``.
    A changed file always has a new size or modification time in practice; an unchanged file is not read again."""

    def __init__(self, path: str | Path | None = None) -> None:
        if path is None:
            path = Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align")) / "file-hashes.json"
        self.path = Path(path)
        self.entries: dict[str, list] = {}
        self.dirty = False
        try:
            loaded = json.loads(self.path.read_text())
            self.entries = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            pass

    def file_digest(self, path: Path) -> str:
        stat = path.stat()
        key, signature = str(path.resolve()), [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = self.entries.get(key)
        if isinstance(entry, list) and len(entry) == 4 and entry[:3] == signature:
            return entry[3]
        digest = _file_digest(path)
        self.entries[key] = [*signature, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.dirty:
            try:
                write_text_durable(self.path, json.dumps(self.entries))
            except OSError:  # a read-only cache only costs re-reading the files next time
                pass
            self.dirty = False


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON through a uniquely named temporary file, fsynced, renamed into place (``align.durable``)."""
    write_text_durable(path, json.dumps(data, indent=2, sort_keys=False, default=str))


@dataclass
class Manifest:
    """The stages of one run. ``save()`` after each change; ``load`` reads what a previous run left. ``owner``:
    the process that holds the run directory's lock (pid, host, started, heartbeat; ``pipelines.lock``)."""

    run_dir: Path
    pipeline: str = ""
    stages: dict[str, dict] = field(default_factory=dict)
    owner: dict | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

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
        return cls(Path(run_dir), data.get("pipeline", ""), data.get("stages", {}), data.get("owner"))

    def save(self) -> None:
        with self._lock:  # the lock's heartbeat thread saves too
            write_json_atomic(self.path, {"version": VERSION, "pipeline": self.pipeline, "updated": now(),
                                          "owner": self.owner, "stages": self.stages})

    def heartbeat(self, owner: dict) -> None:
        self.owner = owner
        self.save()

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
