"""Values interpolated from the environment (``${oc.env:WANDB_API_KEY}``) reach the running code but never a file
of the run directory or the config sent to W&B: ``config.yaml``, ``--cfg job`` and W&B show ``<from env: NAME>``."""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import pytest

from align.config.compose import ComposedConfig, compose_run_config, redacted
from align.config.run import stage_config
from pipelines.runner import run_pipeline

from .tiny import TINY

SECRET_A = "sk-fake-3f9c2a71-alpha"
SECRET_B = "sk-fake-3f9c2a71-beta"
# a target_modules regex that matches what the default does, with the secret in a regex comment
TARGETS_B = f".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)(?#{SECRET_B})"


@pytest.fixture
def secrets(monkeypatch):
    monkeypatch.setenv("ALIGN_TEST_SECRET_A", SECRET_A)
    monkeypatch.setenv("ALIGN_TEST_SECRET_B", TARGETS_B)
    monkeypatch.setenv("ALIGN_TEST_SEED", "7")


def leaks(value) -> bool:
    text = repr(value)
    return SECRET_A in text or SECRET_B in text


# ------------------------------------------------------------------------------------------------ compose
def test_compose_remembers_every_value_from_the_environment(secrets):
    cfg = compose_run_config([
        "run.name=${oc.env:ALIGN_TEST_SECRET_A}",
        "tracking.group=team-${run.name}",  # through another key
        "run.seed='${oc.decode:${oc.env:ALIGN_TEST_SEED}}'",  # decoded to a number
        "model.target_modules=[q_proj,'${oc.env:ALIGN_TEST_SECRET_B}']",  # inside a list
        "tracking.project=plain",
    ])
    # the running code gets the real values, with their types
    assert cfg.run.name == SECRET_A and cfg.tracking.group == f"team-{SECRET_A}"
    assert cfg.run.seed == 7 and type(cfg.run.seed) is int
    assert list(cfg.model.target_modules) == ["q_proj", TARGETS_B]
    assert isinstance(cfg.raw, ComposedConfig)
    assert cfg.raw.env_sourced == {"run.name": ("ALIGN_TEST_SECRET_A",), "run.seed": ("ALIGN_TEST_SEED",),
                                   "tracking.group": ("ALIGN_TEST_SECRET_A",),
                                   "model.target_modules.1": ("ALIGN_TEST_SECRET_B",)}
    clean = redacted(cfg.raw)
    assert not leaks(clean)
    assert clean["run"]["name"] == "<from env: ALIGN_TEST_SECRET_A>"
    assert clean["tracking"]["group"] == "<from env: ALIGN_TEST_SECRET_A>"
    assert clean["run"]["seed"] == "<from env: ALIGN_TEST_SEED>"
    assert clean["model"]["target_modules"] == ["q_proj", "<from env: ALIGN_TEST_SECRET_B>"]
    assert clean["tracking"]["project"] == "plain" and type(clean) is dict


def test_the_marks_survive_pickling_and_derived_configs(secrets):
    """Ray ships the config to its workers; a stage's config (the manifest's) is built from the typed specs."""
    cfg = compose_run_config(["model.target_modules=${oc.env:ALIGN_TEST_SECRET_B}"])
    shipped = pickle.loads(pickle.dumps(cfg))
    assert shipped.model.target_modules == TARGETS_B
    assert shipped.raw.env_sourced == cfg.raw.env_sourced
    assert not leaks(redacted(shipped.raw))
    base = stage_config(shipped, "base")
    assert leaks(base) and not leaks(redacted(base))


def test_cfg_job_prints_no_secret(secrets, capsys):
    from align import run

    assert run.main(["run.name=${oc.env:ALIGN_TEST_SECRET_A}", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert SECRET_A not in out and "name: '<from env: ALIGN_TEST_SECRET_A>'" in out


def test_wandb_gets_the_redacted_config(secrets, tmp_path, monkeypatch):
    from align.tracking import Tracker
    from pipelines.context import flatten

    sent = {}

    class FakeRun:
        def log(self, *a, **k):
            pass

        def finish(self):
            pass

    fake = types.SimpleNamespace(init=lambda **kwargs: sent.update(kwargs) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = compose_run_config(["run.name=${oc.env:ALIGN_TEST_SECRET_A}"])
    Tracker(tmp_path, config=flatten(cfg.raw), wandb="offline").close()  # what StageContext.tracker passes
    assert sent["config"]["run.name"] == "<from env: ALIGN_TEST_SECRET_A>"
    assert not leaks(sent["config"]) and sent["config"]["tracking.project"] == "align"


# ------------------------------------------------------------------------------------------------ a real run
@pytest.fixture(scope="module")
def run_with_secrets(pipeline_environment, tmp_path_factory):
    """The base stage in this process with W&B offline: one secret in a key no stage's config holds
    (``model.name``), one in a key the base stage's config holds (``model.target_modules``)."""
    run_dir = tmp_path_factory.mktemp("secrets") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGN_TEST_SECRET_A", SECRET_A)
        mp.setenv("ALIGN_TEST_SECRET_B", TARGETS_B)
        cfg = compose_run_config([*TINY, "ray.enabled=false", "tracking.wandb=offline", f"run.dir={run_dir}",
                                  "pipeline.stages=[base]", "model.name=${oc.env:ALIGN_TEST_SECRET_A}",
                                  "model.target_modules=${oc.env:ALIGN_TEST_SECRET_B}"])
        run_pipeline(cfg, log=lambda line: None)
    return cfg, run_dir


def files_holding(run_dir: Path, text: str) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                  if p.is_file() and text.encode() in p.read_bytes())


def test_no_file_of_the_run_holds_a_secret(run_with_secrets):
    cfg, run_dir = run_with_secrets
    assert cfg.model.name == SECRET_A and cfg.model.target_modules == TARGETS_B  # what the stages ran with
    assert files_holding(run_dir, SECRET_A) == []
    assert files_holding(run_dir, SECRET_B) == []
    written = (run_dir / "config.yaml").read_text()
    assert "name: '<from env: ALIGN_TEST_SECRET_A>'" in written
    assert "target_modules: '<from env: ALIGN_TEST_SECRET_B>'" in written
    wandb_files = [f for f in files_holding(run_dir, "<from env: ALIGN_TEST_SECRET_A>") if "wandb" in f]
    assert wandb_files, "W&B (offline) got no config at all"


def test_the_manifest_holds_no_secret(run_with_secrets):
    _, run_dir = run_with_secrets
    assert files_holding(run_dir, SECRET_B) == []


def test_a_sweep_files_overrides_reach_compose_unresolved(secrets, tmp_path, monkeypatch):
    """A sweep file's ``overrides`` are run-config overrides: resolved by compose (which keeps the secret out of
    every file), not when the sweep file is read (which would turn it into a plain value)."""
    import shutil

    from align.sweep import expand_trials, load_sweep, trial_overrides

    configs = Path(__file__).resolve().parents[2] / "configs"
    shutil.copytree(configs, tmp_path / "configs")
    (tmp_path / "configs" / "sweep" / "team.yaml").write_text(
        "name: team\npipeline: dpo\nparameters:\n  trainer.dpo.beta: [0.1]\n"
        "overrides: ['tracking.project=${oc.env:ALIGN_TEST_SECRET_A}']\n")
    monkeypatch.setenv("ALIGN_CONFIG_DIR", str(tmp_path / "configs"))
    spec = load_sweep("team", {})
    assert spec.overrides == ["tracking.project=${oc.env:ALIGN_TEST_SECRET_A}"]
    cfg = compose_run_config(trial_overrides(spec, [], expand_trials(spec)[0], tmp_path / "sweep"))
    assert cfg.tracking.project == SECRET_A
    assert redacted(cfg.raw)["tracking"]["project"] == "<from env: ALIGN_TEST_SECRET_A>"
