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
WEIGHTS = {"base": 0.1, "sft": 0.35, "dpo": 0.4, "eval": 0.15}  # where kills are aimed


@pytest.fixture(scope="module", autouse=True)
def _environment(pipeline_environment):
    yield


def _start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "align.run", *TINY, f"run.dir={run_dir}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _finish(run_dir: Path) -> None:
    proc = _start(run_dir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]


def _stages(run_dir: Path) -> dict[str, dict]:
    return Manifest.load(run_dir).stages if (run_dir / "manifest.json").exists() else {}


def _check_nothing_lost(run_dir: Path, done_before: dict[str, int]) -> dict[str, int]:
    """The manifest parses; every stage it calls done has intact artifacts; a stage done before stays done with
    the same attempt count (it was not run again). Returns the done stages and their attempts."""
    stages = _stages(run_dir)
    done = {name: rec["attempts"] for name, rec in stages.items() if rec.get("status") == "done"}
    for name, attempts in done_before.items():
        assert done.get(name) == attempts, (name, stages.get(name))
    for name in done:
        assert artifact_problems(run_dir, stages[name], HashCache(run_dir.parent / "hashes.json")) == [], name
    return done


def _kill_inside(run_dir: Path, stage: str, seconds: float, rng: random.Random) -> str:
    """Run the pipeline and SIGKILL its process group at a random moment within 1.5 x ``seconds`` of the start of
    ``stage``. Returns where the kill landed, or 'finished'."""
    proc = _start(run_dir)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"[{stage}] running (attempt"):
            time.sleep(rng.uniform(0.0, 1.5 * seconds))
            break
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        running = [n for n, r in _stages(run_dir).items() if r.get("status") == "running"]
        return running[0] if running else "between stages"
    out = "".join(seen) + proc.stdout.read()
    assert proc.wait() == 0, out[-3000:]
    return "finished"


def _assert_uninterrupted_result(run_dir: Path, reference: Path) -> None:
    stages = _stages(run_dir)
    assert [s for s in DPO_STAGES if stages[s]["status"] == "done"] == DPO_STAGES
    for stage in ("sft", "dpo"):
        assert files_of(run_dir / stage / "adapter") == files_of(reference / stage / "adapter"), stage
    assert (run_dir / "dpo" / "pairs.jsonl").read_bytes() == (reference / "dpo" / "pairs.jsonl").read_bytes()
    result, expected = (json.loads((d / "eval" / "result.json").read_text()) for d in (run_dir, reference))
    assert result == expected


def test_twenty_random_kills_then_the_uninterrupted_result(tmp_path):
    reference = tmp_path / "reference"
    _finish(reference)  # also builds the tiny base in this session's cache
    seconds = {s: r["seconds"] for s, r in _stages(reference).items()}
    rng = random.Random(20261206)
    run_dir, runs, done = tmp_path / "chaos-1", 1, {}
    landed: list[str] = []
    aimed: dict[str, int] = {}  # kills aimed at each stage of this run dir: each one widens the window (progress)
    for _ in range(KILLS):
        pending = [s for s in DPO_STAGES if s not in done]
        stage = rng.choices(pending, [WEIGHTS[s] for s in pending])[0]
        aimed[stage] = aimed.get(stage, 0) + 1
        landed.append(_kill_inside(run_dir, stage, seconds[stage] * 2 ** (aimed[stage] - 1), rng))
        done = _check_nothing_lost(run_dir, done)
        if len(done) == len(DPO_STAGES):  # this run is over: check it, then chaos on a fresh one
            _assert_uninterrupted_result(run_dir, reference)
            runs += 1
            run_dir, done, aimed = tmp_path / f"chaos-{runs}", {}, {}
    _finish(run_dir)
    _check_nothing_lost(run_dir, done)
    _assert_uninterrupted_result(run_dir, reference)
    inside = [where for where in landed if where in DPO_STAGES]
    assert len(inside) >= KILLS // 2 and {"sft", "dpo"} <= set(inside), landed  # most kills hit a running stage
