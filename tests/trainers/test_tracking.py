"""Tracking: metrics.jsonl always (one line per log with step and wall time), W&B only when asked, offline
unless a key or online mode is set."""

import json
import subprocess
import sys

import pytest

from align.tracking import Tracker, wandb_mode
from align.tracking.tracker import read_metrics

from .helpers import build_trainer


def test_metrics_jsonl_lines(tmp_path):
    with Tracker(tmp_path, wandb="off") as tracker:
        tracker.log({"train/loss": 1.5, "count": 3}, step=1)
        tracker.log({"eval/nll": float("nan")}, step=2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first.keys() == {"step", "time", "train/loss", "count"}
    assert second.keys() == {"step", "time", "eval/nll"}
    assert (first["step"], first["train/loss"], first["count"]) == (1, 1.5, 3.0)
    assert 0 <= first["time"] <= second["time"] < 60
    assert second["eval/nll"] != second["eval/nll"]  # NaN is kept, as JSON's NaN


def test_trainer_logs_every_n_steps_and_the_last(tmp_path):
    """log_every 2 over 5 steps: steps 2, 4 and the final 5."""
    loop = {"max_steps": 5, "log_every": 2, "grad_accum_steps": 1}
    trainer = build_trainer("sft", tmp_path / "run", loop=loop)
    with Tracker(tmp_path / "run", wandb="off") as tracker:
        trainer.tracker = tracker
        trainer.fit()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 5]
    for record in records:
        assert {"train/loss", "train/nll", "train/grad_norm", "train/lr", "time"} <= record.keys()
        assert record["train/loss"] == pytest.approx(record["train/nll"])  # SFT loss = token-mean NLL


def test_wandb_off_never_imports_wandb(tmp_path):
    code = (
        "import sys\n"
        "from align.tracking import Tracker\n"
        "import align.trainers.loop\n"
        f"with Tracker({str(tmp_path)!r}, wandb='off') as t:\n"
        "    t.log({'loss': 1.0}, step=1)\n"
        "print('wandb' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_wandb_mode(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # set by tests/conftest.py; auto is judged without it
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    assert wandb_mode("off") is None
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert wandb_mode("auto") == "online"
    assert wandb_mode("offline") == "offline"  # an explicit mode wins over the key
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") is None
    with pytest.raises(ValueError, match="expected one of auto, off, offline, online"):
        wandb_mode("sometimes")
