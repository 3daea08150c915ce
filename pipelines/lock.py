"""One owner per run directory: ``<run.dir>/.lock``.

Two ``align.run`` processes on one run directory would both train, overwrite each other's manifest and collide on
temporary files. ``RunLock`` takes an exclusive ``flock`` on ``.lock`` for as long as the run lasts (the kernel
drops it when the process dies, kill -9 included, so a crashed run never blocks the next one) and writes its owner
into it: pid, host, start time and a heartbeat refreshed every ``heartbeat_s`` seconds. A second process is
refused with a message that names the owner.

Shared filesystems do not always carry ``flock`` between hosts. The owner record covers them: a lock whose
owner did not release it, runs on another host and beat less than ``stale_s`` seconds ago is taken as held; an
older one is stale (its owner crashed) and is taken over, which the caller is told about.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from align.config.errors import ConfigError

LOCK_FILE = ".lock"


class RunDirBusy(ConfigError):
    """``run.dir`` is owned by another live run."""


def _owner_text(owner: dict, now: float) -> str:
    beat = owner.get("heartbeat")
    age = f", last heartbeat {now - beat:.0f} s ago" if isinstance(beat, (int, float)) else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"])) if owner.get("started") else "?"
    return f"pid {owner.get('pid')} on host {owner.get('host')}, running since {since}{age}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str | Path, heartbeat_s: float = 30.0, stale_s: float = 300.0,
                 on_heartbeat: Callable[[dict], None] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.on_heartbeat = on_heartbeat
        self.owner: dict = {}
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- acquire
    def acquire(self) -> str | None:
        """Own the run directory. Returns a note when a stale lock (a crashed run's) was taken over; raises
        ``RunDirBusy`` when another run owns it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        flocked = True
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            previous = self._read(fd)
            os.close(fd)
            raise self._busy(previous) from None
        except (ImportError, OSError) as exc:  # no flock here (some network filesystems): the record decides
            if isinstance(exc, OSError) and exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS,
                                                               errno.EINVAL):
                os.close(fd)
                raise
            flocked = False
        previous = self._read(fd)
        now = time.time()
        note = None
        if previous and not previous.get("released", True):
            mine = previous.get("host") == socket.gethostname()
            beat = previous.get("heartbeat") or previous.get("started") or 0
            fresh = now - beat < self.stale_s
            alive = _pid_alive(int(previous.get("pid", 0))) if mine and previous.get("pid") else False
            if (mine and alive and not flocked) or (not mine and fresh):
                os.close(fd)
                raise self._busy(previous)
            note = (f"took over the lock of {_owner_text(previous, now)}: that run stopped without releasing it "
                    "(crashed or was killed)")
        self._fd = fd
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": now, "heartbeat": now,
                      "released": False}
        self._write()
        self._thread = threading.Thread(target=self._beat, name="align-run-lock", daemon=True)
        self._thread.start()
        return note

    def _busy(self, owner: dict) -> RunDirBusy:
        who = _owner_text(owner, time.time()) if owner else "another process (no owner recorded yet)"
        return RunDirBusy("run.dir", str(self.run_dir),
                          f"a run directory no other run is using: it is in use by {who} ({self.path}). Wait for "
                          "that run to finish or stop it, or choose another run.dir")

    @staticmethod
    def _read(fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self) -> None:
        with self._write_lock:
            if self._fd is None:
                return
            blob = json.dumps(self.owner).encode()
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.ftruncate(self._fd, 0)
            os.write(self._fd, blob)
            os.fsync(self._fd)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.owner["heartbeat"] = time.time()
            try:
                self._write()
                if self.on_heartbeat is not None:
                    self.on_heartbeat(dict(self.owner))
            except Exception:  # a missed beat is harmless; the next one retries
                pass

    # ------------------------------------------------------------------------------------------- release
    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.owner["released"] = True
        self.owner["heartbeat"] = time.time()
        self._write()
        fd, self._fd = self._fd, None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)
        except (ImportError, OSError):
            pass
        os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
