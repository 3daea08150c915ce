"""Checkpoints that hold everything an exact resume needs, written atomically.

    checkpoints/step-000010/
        trainable.safetensors   every trainable tensor (adapters, heads), by qualified name
        optimizer.pt            the back-end's optimizer state (read back with torch.load(weights_only=True))
        deepspeed/              instead of optimizer.pt with trainer.deepspeed: the engine's shards, one per rank
        rng.safetensors         torch RNG states (rng-rank<r>.safetensors: those of rank r > 0)
        adalora.safetensors     when an AdaLoRA adapter trains: its allocator's importance / uncertainty EMAs
        state.json              step, data position, scheduler, Python RNG, trainer extras (KL controller, ...),
                                AdaLoRA's step count and keep-masks
    checkpoints/latest          the name of the newest complete checkpoint

A checkpoint is written into a temporary directory and renamed into place, then ``latest`` is replaced
atomically: a crash at any moment leaves the previous checkpoint complete and pointed to. With several ranks
(DeepSpeed) every rank calls ``save_checkpoint``: each writes its back-end shards and RNG states into the same
temporary directory, and rank 0 alone writes the rest, renames and prunes.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from align.durable import fsync_dir, fsync_tree, write_text_durable

LATEST = "latest"


def capture_rng() -> tuple[dict[str, torch.Tensor], list]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            tensors[f"torch_cuda_{i}"] = torch.cuda.get_rng_state(i)
    version, state, gauss = random.getstate()
    return tensors, [version, list(state), gauss]


def restore_rng(tensors: dict[str, torch.Tensor], python_state: list) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    for key, value in tensors.items():
        if key.startswith("torch_cuda_") and torch.cuda.is_available():
            torch.cuda.set_rng_state(value, int(key.rsplit("_", 1)[1]))
    version, state, gauss = python_state
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(root: str | Path, step: int, trainable: dict[str, torch.Tensor], state: dict[str, Any],
                    keep: int = 2, write_extra: Callable[[Path], dict] | None = None, rank: int = 0,
                    barrier: Callable[[], None] = lambda: None) -> Path:
    """Write checkpoint ``step`` under ``root`` and keep only the newest ``keep`` ones. Returns its directory.
    ``write_extra(directory)`` writes further files (the optimizer state) and returns entries for state.json.
    Several ranks: all call it with their ``rank`` and a ``barrier``; rank 0's ``trainable`` and state are written."""
    root = Path(root)
    name = f"step-{step:06d}"
    tmp = root / f".tmp-{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    barrier()
    if write_extra is not None:
        state = {**state, **write_extra(tmp)}
    rng_tensors, python_rng = capture_rng()
    save_file(rng_tensors, str(tmp / _rng_file(rank)))
    barrier()
    final = root / name
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "python_rng": python_rng}))
        fsync_tree(tmp)  # flushed before the rename and the pointer: a crash never leaves an empty checkpoint
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)
        write_text_durable(root / LATEST, name)
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(root: str | Path, log: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete checkpoint under ``root``, or None when none was ever written.

    ``latest`` names it. A pointer that is empty, unreadable or names a missing or incomplete checkpoint (a crash
    on a filesystem that lost the last writes) falls back to the newest complete ``step-*`` directory, and says
    so through ``log`` (default: a warning); when checkpoints were written but none is complete, it raises rather
    than restart training from step 0 without a word."""
    root = Path(root)
    pointer = root / LATEST
    steps = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    if not pointer.is_file() and not steps:
        return None
    try:
        named = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        named = ""
    if named and _complete(root / named):
        return root / named
    problem = (f"{pointer} is missing" if not pointer.is_file() else f"{pointer} is empty" if not named
               else f"{pointer} names {named}, which is missing or incomplete")
    for candidate in steps:
        if _complete(candidate):
            message = f"{problem}: resuming from {candidate.name}, the newest complete checkpoint"
            if log is None:
                warnings.warn(message, stacklevel=2)
            else:
                log(message)
            return candidate
    raise RuntimeError(f"{problem}, and no checkpoint under {root} is complete ({len(steps)} incomplete): "
                       f"move {root} away to restart this stage from step 0")


def _complete(path: Path) -> bool:
    """A checkpoint directory whose state.json parses and whose tensors exist."""
    if not (path / "trainable.safetensors").is_file():
        return False
    try:
        json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def load_checkpoint(path: str | Path, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable tensors, state) of a checkpoint. Restores the RNG states of ``rank`` as a side effect (Python's
    from rank 0)."""
    path = Path(path)
    trainable = load_file(str(path / "trainable.safetensors"))
    state = json.loads((path / "state.json").read_text())
    restore_rng(load_file(str(path / _rng_file(rank))), state.pop("python_rng"))
    return trainable, state


def _rng_file(rank: int) -> str:
    return "rng.safetensors" if rank == 0 else f"rng-rank{rank}.safetensors"
