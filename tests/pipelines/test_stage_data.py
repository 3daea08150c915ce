"""The stages read the user's data under the user's key: errors say ``data.sft=<path> row N``, and the rows held
out of a training file (``data.sft_eval_rows``) never include a copy of a row trained on. In this process
(``ray.enabled=false``) on the tiny embedded base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.config.compose import compose_run_config
from pipelines.manifest import Manifest
from pipelines.runner import StageFailed, run_pipeline

from .tiny import TINY as TINY_OVERRIDES

TINY = [*TINY_OVERRIDES, "tracking.wandb=off", "ray.enabled=false"]


@pytest.fixture(scope="module", autouse=True)
def _environment(pipeline_environment):
    yield


def _run(run_dir: Path, *overrides: str) -> Manifest:
    return run_pipeline(compose_run_config([*TINY, f"run.dir={run_dir}", *overrides]), log=lambda _: None)


@pytest.fixture(scope="module")
def sft_rows(tmp_path_factory) -> list[dict]:
    """The embedded task's SFT rows (the tiny base's tokenizer knows their words)."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    manifest = _run(run_dir, "pipeline.stages=[base]")
    data_dir = Path(manifest.stages["base"]["artifacts"]["data_dir"])
    return [json.loads(line) for line in (data_dir / "sft.jsonl").read_text().splitlines()][:40]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_bad_row_is_named_by_the_users_key(tmp_path, sft_rows):
    rows = [dict(row) for row in sft_rows]
    rows[11]["completion"] = ""
    path = _write(tmp_path / "sft.jsonl", rows)
    with pytest.raises(StageFailed) as info:
        _run(tmp_path / "run", "pipeline.stages=[base,sft]", f"data.sft={path}")
    assert f"data.sft={path} row 12, field 'completion': empty response" in str(info.value)  # was data.train


def test_a_duplicated_row_is_not_both_trained_on_and_held_out(tmp_path, sft_rows, monkeypatch):
    """The last row repeats row 1: the tail split held the last row out and trained on row 1, its copy. Now
    both copies are held out (with rows 38 and 39: data.sft_eval_rows=4 rows in all)."""
    import align.trainers.sft as sft_module

    seen = {}
    real = sft_module.build_sft_trainer

    def spy(model, train, held, *args, **kwargs):
        seen.update(train=train, held=held)
        return real(model, train, held, *args, **kwargs)

    monkeypatch.setattr(sft_module, "build_sft_trainer", spy)
    path = _write(tmp_path / "sft.jsonl", [*sft_rows[:39], sft_rows[0]])
    manifest = _run(tmp_path / "run", "pipeline.stages=[base,sft]", f"data.sft={path}", "data.sft_eval_rows=4")
    assert seen["held"]["row"] == [1, 38, 39, 40]
    assert seen["train"]["row"] == list(range(2, 38))
    assert manifest.stages["sft"]["metrics"]["train_rows"] == 36
