"""pipelines.runner end to end on a tiny embedded config, in this process (``ray.enabled=false``): the manifest,
skipping finished stages, restarting changed ones (and everything after them), resuming a failed stage, the
stage cache shared between runs, and a GRPO pipeline."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from align.config.compose import compose_run_config
from pipelines import stages as stage_module
from pipelines.manifest import Manifest, hash_path
from pipelines.runner import StageFailed, run_pipeline, stage_digests

from .tiny import TINY as TINY_OVERRIDES

TINY = [*TINY_OVERRIDES, "tracking.wandb=off", "ray.enabled=false"]
DPO_STAGES = ["base", "sft", "dpo", "eval"]
SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
HEX16 = re.compile(r"[0-9a-f]{16}")


@pytest.fixture(scope="module", autouse=True)
def _environment(pipeline_environment):
    yield


def run(run_dir: Path, *overrides: str) -> tuple[Manifest, list[str]]:
    lines: list[str] = []
    manifest = run_pipeline(compose_run_config([*TINY, f"run.dir={run_dir}", *overrides]), log=lines.append)
    return manifest, lines


def said(lines: list[str], stage: str) -> list[str]:
    return [line for line in lines if line.startswith(f"[{stage}] ")]


def skipped(lines: list[str]) -> list[str]:
    return [s for s in DPO_STAGES if f"[{s}] done earlier with the same config: skipped" in lines]


def ran(lines: list[str]) -> list[str]:
    return [s for s in DPO_STAGES if any(line.startswith(f"[{s}] running (attempt ") for line in lines)]


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> tuple[Path, list[str], Path]:
    """One finished dpo run (publishing into a stage cache); tests that change it work on copies."""
    root = tmp_path_factory.mktemp("fresh")
    run_dir, cache = root / "run", root / "cache"
    _, lines = run(run_dir, f"run.stage_cache={cache}")
    return run_dir, lines, cache


@pytest.fixture
def copy_of_fresh(fresh, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(fresh[0], target)
    return target


# ------------------------------------------------------------------------------------------------ (a) fresh run
def test_fresh_run_records_every_stage(fresh):
    run_dir, lines, cache = fresh
    data = json.loads((run_dir / "manifest.json").read_text())
    assert data["pipeline"] == "dpo" and data["version"] == 1
    assert list(data["stages"]) == DPO_STAGES
    assert ran(lines) == DPO_STAGES and skipped(lines) == []
    running = [i for i, line in enumerate(lines) if "running (attempt 1)" in line]
    assert [lines[i][1:].split("]")[0] for i in running] == DPO_STAGES  # in pipeline order

    cfg = compose_run_config([*TINY, f"run.dir={run_dir}", f"run.stage_cache={cache}"])
    digests = stage_digests(cfg)
    stages = data["stages"]
    base_dir = Path(stages["base"]["artifacts"]["model_dir"])
    assert (base_dir / "config.json").is_file()
    fingerprint = stages["base"]["inputs"]["model/config.json"]
    assert fingerprint == hash_path(base_dir / "config.json")
    for name in DPO_STAGES:
        rec = stages[name]
        assert rec["status"] == "done" and rec["attempts"] == 1 and rec["error"] is None
        assert rec["reused_from"] is None
        assert HEX16.fullmatch(rec["config_hash"]) and rec["config_hash"] == digests[name]
        assert rec["base"] == {"path": str(base_dir), "fingerprint": fingerprint}
        for artifact in rec["artifacts"].values():
            if artifact is not None:
                path = Path(artifact)
                assert (path if path.is_absolute() else run_dir / path).exists(), (name, artifact)
        hashed = {k: v for k, v in rec["inputs"].items() if k != "architecture"}
        assert hashed, name
        for path, digest in hashed.items():
            assert SHA256.fullmatch(digest)
            source = base_dir / "config.json" if name == "base" else Path(path)  # base: a label
            assert digest == hash_path(source), (name, path)
    assert len(set(digests.values())) == 4

    assert stages["sft"]["artifacts"] == {"adapter": "sft/adapter"}
    assert stages["dpo"]["artifacts"] == {"adapter": "dpo/adapter", "pairs": "dpo/pairs.jsonl"}
    assert stages["eval"]["artifacts"] == {"result": "eval/result.json"}
    assert (run_dir / "sft" / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "dpo" / "adapter" / "adapter_config.json").is_file()
    pairs = (run_dir / "dpo" / "pairs.jsonl").read_text().splitlines()
    assert 0 < len(pairs) <= 32 and {"prompt", "chosen", "rejected"} <= set(json.loads(pairs[0]))

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["run"]["dir"] == str(run_dir) and config["trainer"]["dpo"]["max_steps"] == 6
    assert config["pipeline"]["stages"] == DPO_STAGES
    report = (run_dir / "report.md").read_text()
    assert report.startswith("# dpo run") and "| dpo | done |" in report

    result = json.loads((run_dir / "eval" / "result.json").read_text())
    n = result["prompts"]
    assert n == 16 and result["wins"] + result["ties"] + result["losses"] == n
    assert result["win_rate"] == pytest.approx(result["wins"] / n + 0.5 * result["ties"] / n)
    assert (result["policy"], result["reference"], result["reward"]) == ("dpo", "sft", "ground_truth")
    assert stages["eval"]["metrics"]["win_rate"] == result["win_rate"]


# ------------------------------------------------------------------------------------------------ (b) rerun
def test_rerun_with_the_same_config_skips_every_stage(copy_of_fresh):
    adapter = copy_of_fresh / "dpo" / "adapter"
    before = files_of(adapter)
    manifest, lines = run(copy_of_fresh)
    assert skipped(lines) == DPO_STAGES and ran(lines) == []
    assert files_of(adapter) == before
    assert all(manifest.stages[s]["attempts"] == 1 for s in DPO_STAGES)


# ------------------------------------------------------------------------------------------------ (c) changes
def test_changing_dpo_beta_restarts_dpo_and_eval_only(copy_of_fresh, fresh):
    old = json.loads((fresh[0] / "manifest.json").read_text())["stages"]
    manifest, lines = run(copy_of_fresh, "trainer.dpo.beta=0.2")
    assert skipped(lines) == ["base", "sft"] and ran(lines) == ["dpo", "eval"]
    (restart,) = [line for line in said(lines, "dpo") if "restarting" in line]
    assert "trainer.dpo.beta 0.1 -> 0.2" in restart
    assert re.search(r"stages after it\W+eval\)$", restart)  # eval follows
    # nothing is deleted: the earlier dpo stage (adapter, checkpoints) is moved aside, byte for byte
    assert "(its earlier files are kept in dpo.old-1/)" in restart
    assert files_of(copy_of_fresh / "dpo.old-1" / "adapter") == files_of(fresh[0] / "dpo" / "adapter")
    assert "restarting it" in said(lines, "eval")[0]
    for name in ("base", "sft"):
        assert manifest.stages[name]["config_hash"] == old[name]["config_hash"]
    for name in ("dpo", "eval"):
        assert manifest.stages[name]["config_hash"] != old[name]["config_hash"]
        assert manifest.stages[name]["status"] == "done"
    assert manifest.stages["dpo"]["config"]["trainer.dpo"]["beta"] == 0.2


def test_changing_sft_max_steps_restarts_sft_and_everything_after(copy_of_fresh):
    manifest, lines = run(copy_of_fresh, "trainer.sft.max_steps=4")
    assert skipped(lines) == ["base"] and ran(lines) == ["sft", "dpo", "eval"]
    (restart,) = [line for line in said(lines, "sft") if "restarting" in line]
    assert "trainer.sft.max_steps 6 -> 4" in restart and re.search(r"stages after it\W+dpo, eval\)$", restart)
    assert "an earlier stage or a data file changed" in said(lines, "dpo")[0]
    assert all(manifest.stages[s]["status"] == "done" for s in DPO_STAGES)
    assert manifest.stages["sft"]["config"]["trainer.sft"]["max_steps"] == 4


# ------------------------------------------------------------------------------------------------ (d) failure
def test_failed_stage_is_recorded_and_resumed(copy_of_fresh, monkeypatch):
    def broken(ctx):
        raise RuntimeError("injected failure")

    monkeypatch.setitem(stage_module.STAGES, "dpo", broken)
    with pytest.raises(StageFailed, match="stage 'dpo' failed: injected failure"):
        run(copy_of_fresh, "trainer.dpo.beta=0.2")
    rec = Manifest.load(copy_of_fresh).stages["dpo"]
    assert rec["status"] == "failed" and rec["attempts"] == 1
    assert rec["error"] == "RuntimeError: injected failure"

    monkeypatch.undo()
    manifest, lines = run(copy_of_fresh, "trainer.dpo.beta=0.2")
    assert skipped(lines) == ["base", "sft"]
    assert "[dpo] failed in an earlier run: resuming from its last checkpoint" in lines
    assert "[dpo] running (attempt 2)" in lines
    rec = manifest.stages["dpo"]
    assert rec["status"] == "done" and rec["attempts"] == 2 and rec["error"] is None
    assert manifest.stages["eval"]["status"] == "done"
    assert (copy_of_fresh / "dpo" / "adapter" / "adapter_config.json").is_file()


# ------------------------------------------------------------------------------------------------ (e) stage cache
def test_stage_cache_reuses_the_shared_stages_of_another_run(fresh, tmp_path):
    first, _, cache = fresh
    # the first run published every stage under <stage>-<digest>
    assert sorted(p.name.split("-")[0] for p in cache.iterdir() if not p.name.startswith(".")) == sorted(DPO_STAGES)
    second = tmp_path / "second"
    manifest, lines = run(second, f"run.stage_cache={cache}", "trainer.dpo.beta=0.2")
    for name in ("base", "sft"):
        (line,) = said(lines, name)
        assert line.startswith(f"[{name}] reused from the stage cache ({cache / name}-")
        rec = manifest.stages[name]
        assert rec["status"] == "done" and rec["reused_from"].startswith(str(cache / f"{name}-"))
        assert rec["config_hash"] == json.loads((first / "manifest.json").read_text())["stages"][name]["config_hash"]
    assert ran(lines) == ["dpo", "eval"]
    assert not any("reused" in line for line in said(lines, "dpo"))
    assert manifest.stages["dpo"]["reused_from"] is None
    assert files_of(second / "sft" / "adapter") == files_of(first / "sft" / "adapter")
    assert not (second / "sft" / "checkpoints").exists()  # the cache holds no checkpoints


# ------------------------------------------------------------------------------------------------ (f) artifacts
def test_deleted_artifact_makes_the_stage_run_again(copy_of_fresh):
    cfg = compose_run_config([*TINY, f"run.dir={copy_of_fresh}"])
    digests = stage_digests(cfg)
    assert Manifest.load(copy_of_fresh).is_done("dpo", digests["dpo"])
    before = files_of(copy_of_fresh / "dpo" / "adapter")
    shutil.rmtree(copy_of_fresh / "dpo" / "adapter")
    manifest = Manifest.load(copy_of_fresh)
    assert not manifest.is_done("dpo", digests["dpo"])
    assert manifest.is_done("sft", digests["sft"])
    assert not manifest.is_done("sft", digests["dpo"])  # another stage's identity

    manifest, lines = run(copy_of_fresh)
    assert skipped(lines)[:2] == ["base", "sft"]
    assert "[dpo] running (attempt 2)" in lines
    assert manifest.stages["dpo"]["status"] == "done" and manifest.stages["dpo"]["attempts"] == 2
    # it resumed from its last checkpoint (step 6 of 6): the same adapter, byte for byte
    assert (copy_of_fresh / "dpo" / "checkpoints").is_dir()
    assert files_of(copy_of_fresh / "dpo" / "adapter") == before


# ------------------------------------------------------------------------------------------------ (g) grpo
def test_grpo_pipeline_completes(tmp_path):
    manifest, lines = run(tmp_path / "grpo", "pipeline=grpo")
    assert list(manifest.stages) == ["base", "sft", "grpo", "eval"]
    assert all(manifest.stages[s]["status"] == "done" for s in manifest.stages)
    assert manifest.stages["grpo"]["artifacts"] == {"adapter": "grpo/adapter"}
    assert (tmp_path / "grpo" / "grpo" / "adapter" / "adapter_config.json").is_file()
    assert manifest.stages["grpo"]["config"]["trainer.grpo"]["reward"] == "ground_truth"
    result = json.loads((tmp_path / "grpo" / "eval" / "result.json").read_text())
    assert (result["policy"], result["reference"], result["prompts"]) == ("grpo", "sft", 16)
    assert result["win_rate"] == pytest.approx((result["wins"] + 0.5 * result["ties"]) / 16)
