"""Chaos: ``python -m align.run`` killed with SIGKILL at 20 random moments, rerun after each kill, then run to the
end. Every rerun must go on from where the last one stopped (never redo a finished stage, never lose its
artifacts, never be refused by the dead run's lock), and the end must be the uninterrupted run's result, byte for
byte."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.manifest import HashCache, Manifest
from pipelines.runner import artifact_problems

from .test_runner import DPO_STAGES, TINY, files_of

REPO = Path(__file__).resolve().parents[2]
KILLS = 20


@pytest.fixture(scope="module", autouse=True)
def _environment(pipeline_environment):
    yield


def _start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "align.run", *TINY, f"run.dir={run_dir}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(run_dir: Path) -> float:
    start = time.perf_counter()
    proc = _start(run_dir)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return time.perf_counter() - start


def _check_nothing_lost(run_dir: Path, done_before: dict[str, int]) -> dict[str, int]:
    """The manifest parses; every stage it calls done has intact artifacts; a stage done before stays done with
    the same attempt count (it was not run again). Returns the done stages and their attempts."""
    if not (run_dir / "manifest.json").exists():
        assert not done_before
        return {}
    stages = Manifest.load(run_dir).stages
    done = {name: rec["attempts"] for name, rec in stages.items() if rec.get("status") == "done"}
    for name, attempts in done_before.items():
        assert done.get(name) == attempts, (name, stages.get(name))
    for name in done:
        assert artifact_problems(run_dir, stages[name], HashCache(run_dir / ".hashes.json")) == [], name
    return done


def test_twenty_random_kills_then_the_uninterrupted_result(tmp_path):
    reference, chaos = tmp_path / "reference", tmp_path / "chaos"
    uninterrupted = _finish(reference)  # also builds the tiny base in this session's cache
    rng = random.Random(20261206)
    done: dict[str, int] = {}
    killed_in: list[str] = []
    for _ in range(KILLS):
        proc = _start(chaos)
        try:
            proc.wait(timeout=rng.uniform(0.2, 1.0) * uninterrupted)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            running = [n for n, r in Manifest.load(chaos).stages.items() if r.get("status") == "running"] \
                if (chaos / "manifest.json").exists() else []
            killed_in.append(running[0] if running else "start-up")
        else:
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            killed_in.append("finished")
        done = _check_nothing_lost(chaos, done)
    _finish(chaos)
    _check_nothing_lost(chaos, done)

    stages = Manifest.load(chaos).stages
    assert [s for s in DPO_STAGES if stages[s]["status"] == "done"] == DPO_STAGES
    for stage in ("sft", "dpo"):
        assert files_of(chaos / stage / "adapter") == files_of(reference / stage / "adapter"), (stage, killed_in)
    assert (chaos / "dpo" / "pairs.jsonl").read_bytes() == (reference / "dpo" / "pairs.jsonl").read_bytes()
    result, expected = (json.loads((d / "eval" / "result.json").read_text()) for d in (chaos, reference))
    assert result == expected
    assert len([k for k in killed_in if k not in ("finished", "start-up")]) >= 5, killed_in  # kills inside stages
