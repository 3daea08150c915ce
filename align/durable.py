"""Durable file writes: what a crash (kill -9, power loss) must not leave half-written or silently empty.

``os.replace`` makes a write atomic for other readers, but not durable: after a power loss the renamed file can
be empty unless its data and the directory entry were flushed. Every file whose loss costs work (manifest,
checkpoints and their ``latest`` pointer, adapters) goes through here: write to a uniquely named temporary file
beside the target, fsync it, rename it into place, fsync the directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename into it, a new file). A no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic there
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under ``root`` and every directory, deepest first (before renaming ``root`` into place)."""
    root = Path(root)
    dirs = []
    for directory, _, files in os.walk(root):
        for name in files:
            fsync_file(os.path.join(directory, name))
        dirs.append(directory)
    for directory in reversed(dirs):
        fsync_dir(directory)


def write_durable(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` writes the content; it is then fsynced and renamed onto ``path`` (temporary names are
    unique per call, so concurrent writers never collide)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_durable(path: str | Path, text: str) -> None:
    write_durable(path, lambda tmp: Path(tmp).write_text(text))


def write_json_durable(path: str | Path, data: Any) -> None:
    write_text_durable(path, json.dumps(data, indent=2, default=str))


def replace_dir_durable(tmp: str | Path, final: str | Path) -> None:
    """Move the finished directory ``tmp`` onto ``final`` (its files flushed first): readers see the old directory
    or the new one, never a half-written one."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
