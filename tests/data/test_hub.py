"""Nothing from the network by surprise: a data name that is not a local file is refused at once (naming the key)
unless ``data.allow_hub=true``; every entry point defaults the Hugging Face libraries to offline (a user's own value
wins) before importing them, and the Ray processes a pipeline starts get the same defaults."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

import align.offline as offline
from align.data import DataError, load_source

ROOT = Path(__file__).resolve().parents[2]
VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.fixture
def clean_env(monkeypatch):
    """No offline variable set, and no default remembered by this process (both restored afterwards)."""
    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(offline, "_set_here", {})
    return monkeypatch


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"datasets.load_dataset{args} was called: a download was attempted")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


def test_a_hub_name_is_refused_at_once_naming_the_key(clean_env, no_network, tmp_path):
    offline.default_offline()
    clean_env.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(DataError) as caught:
        load_source("my_sft_data", "data.sft")
    assert time.perf_counter() - start < 1.0
    message = str(caught.value)
    assert message.startswith("data.sft='my_sft_data' is not a local file or directory")
    assert "data.allow_hub=true" in message and "network" in message
    assert "HF_DATASETS_OFFLINE=1" in message


def test_allow_hub_false_refuses_even_online(clean_env, no_network, tmp_path):
    clean_env.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data.prompts='org/prompts' is not a local file.*data.allow_hub=true"):
        load_source("org/prompts", "data.prompts", allow_hub=False)


@pytest.mark.parametrize("allow_hub", [True, None])
def test_with_hub_access_the_loader_is_attempted(clean_env, tmp_path, allow_hub):
    """``allow_hub=True``, or the environment online (what the entry points leave with data.allow_hub=true)."""
    clean_env.chdir(tmp_path)
    calls = []

    def fake_load(name, **kwargs):
        calls.append((name, kwargs["split"]))
        return datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}])

    clean_env.setattr(datasets, "load_dataset", fake_load)
    ds = load_source("org/sft", "data.sft", split="train", allow_hub=allow_hub)
    assert calls == [("org/sft", "train")] and len(ds) == 1


def test_a_missing_local_file_is_not_taken_for_a_hub_name(clean_env, no_network, tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_source(str(tmp_path / "sft.jsonl"), "data.sft", allow_hub=True)


# ------------------------------------------------------------------------------------------- entry points
def test_align_run_refuses_a_hub_name_before_anything_starts(clean_env, no_network, tmp_path, capsys):
    from align import run
    from pipelines import runner

    clean_env.chdir(tmp_path)
    clean_env.setattr(runner, "run_pipeline", lambda *a, **k: pytest.fail("the pipeline started"))
    start = time.perf_counter()
    code = run.main(["data.sft=my_sft_data", f"run.dir={tmp_path / 'run'}", "ray.enabled=false"])
    assert code == 2 and time.perf_counter() - start < 20
    err = capsys.readouterr().err
    assert "config error: data.sft='my_sft_data' is not a local file or directory" in err
    assert "data.allow_hub=true" in err
    assert not (tmp_path / "run").exists()


def test_align_run_defaults_offline_unless_allow_hub(clean_env, capsys):
    from align import run

    assert run.main(["--cfg", "job"]) == 0
    assert {var: os.environ.get(var) for var in VARS} == {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for var in VARS:
        clean_env.delenv(var)
    clean_env.setattr(offline, "_set_here", {})
    assert run.main(["data.allow_hub=true", "--cfg", "job"]) == 0
    assert not any(var in os.environ for var in VARS)


def test_a_value_the_user_set_wins(clean_env, capsys):
    from align import run

    clean_env.setenv("HF_HUB_OFFLINE", "0")
    assert run.main(["--cfg", "job"]) == 0
    assert os.environ["HF_HUB_OFFLINE"] == "0" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert offline.worker_env() == {"HF_DATASETS_OFFLINE": "1"}  # the user's own value travels the user's way


@pytest.mark.parametrize("module", ["generate", "export", "convert"])
def test_tool_entry_points_default_offline(clean_env, module, capsys):
    import importlib

    main = importlib.import_module(f"align.{module}").main
    main(["--help"])
    assert {var: os.environ.get(var) for var in VARS} == {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_sweep_defaults_offline_before_running(clean_env, tmp_path):
    from align import sweep

    seen = {}

    def fake_run_sweep(spec, common, sweep_dir, log=print):
        seen.update({var: os.environ.get(var) for var in VARS})
        return [{"error": ""}]

    clean_env.setattr(sweep, "run_sweep", fake_run_sweep)
    assert sweep.main(["sweep=dpo_beta", f"run.dir={tmp_path}"]) == 0
    assert seen == {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_the_defaults_come_before_the_hugging_face_libraries_are_imported(tmp_path):
    """In a fresh process: ``huggingface_hub`` reads HF_HUB_OFFLINE once, at import, and validating the config
    imports transformers, so the entry point must set it before."""
    env = {k: v for k, v in os.environ.items() if k not in VARS}
    script = ("import sys; from align.run import main; main(['--cfg', 'job']); "
              "import huggingface_hub.constants as c; print('OFFLINE', c.HF_HUB_OFFLINE)")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OFFLINE True" in out.stdout


# ------------------------------------------------------------------------------------------- Ray processes
def test_ray_workers_get_the_offline_defaults(clean_env, tmp_path):
    """The job's runtime environment carries the defaults to every process of the job (stage tasks, Ray Train
    workers, Tune trials), on a cluster whose nodes never saw this process's environment."""
    import ray

    from align.config.compose import compose_run_config
    from pipelines.executors import start_ray

    offline.default_offline()
    cfg = compose_run_config(["ray.num_cpus=1"])
    seen = {}
    clean_env.setattr(ray, "is_initialized", lambda: False)
    clean_env.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    assert start_ray(cfg, tmp_path)
    assert seen["runtime_env"] == {"env_vars": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}}
    seen.clear()
    clean_env.setenv("RAY_ADDRESS", "ray://cluster:10001")
    assert start_ray(cfg, tmp_path)
    assert seen["address"] == "ray://cluster:10001"
    assert seen["runtime_env"] == {"env_vars": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}}


def test_no_runtime_env_when_the_user_chose(clean_env, tmp_path):
    """With data.allow_hub=true (or the user's own values) nothing is added: a submitted job's runtime_env that
    sets these variables would otherwise conflict with ray.init's."""
    import ray

    from align.config.compose import compose_run_config
    from pipelines.executors import start_ray

    offline.default_offline(allow_hub=True)
    seen = {}
    clean_env.setattr(ray, "is_initialized", lambda: False)
    clean_env.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    start_ray(compose_run_config(["ray.num_cpus=1"]), tmp_path)
    assert "runtime_env" not in seen
