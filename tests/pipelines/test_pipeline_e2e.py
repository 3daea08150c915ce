"""End-to-end pipeline runs through Ray (slow): kill -9 during DPO then resume, a Ray Job on a local
`ray start --head` cluster, a 4-trial sweep, and W&B offline tracking."""

from __future__ import annotations

import csv
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .tiny import TINY

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("align-cache")
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "ALIGN_CACHE": str(cache), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "PATH": bin_dir + os.pathsep + os.environ["PATH"], "PYTHONUNBUFFERED": "1"}


def align_run(args, env, **kwargs):
    return subprocess.run([sys.executable, "-m", "align.run", *TINY, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, **kwargs)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def adapter_tensors(run_dir: Path, stage: str) -> dict:
    return load_file(str(run_dir / stage / "adapter" / "adapter_model.safetensors"))


def test_kill_9_during_dpo_then_rerun_resumes_to_the_same_adapter(tmp_path, env):
    dpo = ["trainer.dpo.max_steps=600", "trainer.dpo.save_every=20"]
    straight = align_run([*dpo, f"run.dir={tmp_path / 'straight'}"], env)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "align.run", *TINY, *dpo, f"run.dir={run_dir}"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = run_dir / "dpo" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(int(p.name[5:]) >= 40 for p in checkpoints.glob("step-*")):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started, mid-DPO
    proc.wait()
    time.sleep(3)
    state = manifest(run_dir)["stages"]
    assert state["dpo"]["status"] == "running" and "eval" not in state or state["eval"]["status"] != "done"
    assert not (run_dir / "dpo" / "adapter").exists()

    resumed = align_run([*dpo, f"run.dir={run_dir}"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout
    assert "[base] done earlier with the same config: skipped" in log
    assert "[sft] done earlier with the same config: skipped" in log
    assert "[dpo] running in an earlier run: resuming from its last checkpoint" in log
    stages = manifest(run_dir)["stages"]
    assert [stages[s]["status"] for s in ("base", "sft", "dpo", "eval")] == ["done"] * 4
    assert stages["dpo"]["attempts"] == 2
    a, b = adapter_tensors(tmp_path / "straight", "dpo"), adapter_tensors(run_dir, "dpo")
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert (a[name] == b[name]).all(), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_to_a_local_head_node(tmp_path, env):
    short = Path(f"/tmp/align-job-{secrets.token_hex(3)}")  # Ray's socket paths must stay short
    short.mkdir()
    token = short / "token"
    token.write_text(secrets.token_hex(32))
    env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    ray = str(Path(sys.executable).parent / "ray")
    gcs, dash = _free_port(), _free_port()
    start = subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
                            f"--temp-dir={short / 'ray'}", "--disable-usage-stats"], env=env, capture_output=True,
                           text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        run_dir = tmp_path / "job-run"
        submit = subprocess.run(
            [ray, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(REPO),
             "--submission-id", "align-test", "--", "python", "-m", "align.run", *TINY, f"run.dir={run_dir}"],
            env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
        status = subprocess.run([ray, "job", "status", f"--address=http://127.0.0.1:{dash}", "align-test"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert "succeeded" in (status.stdout + status.stderr).lower()
        stages = manifest(run_dir)["stages"]
        assert [stages[s]["status"] for s in ("base", "sft", "dpo", "eval")] == ["done"] * 4
        assert (run_dir / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
        assert (run_dir / "report.md").is_file()
        result = json.loads((run_dir / "eval" / "result.json").read_text())
        assert result["prompts"] == 16 and result["wins"] + result["ties"] + result["losses"] == 16
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_four_trial_sweep_shares_base_and_sft(tmp_path, env):
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "align.sweep", "sweep=dpo_beta", "sweep.max_concurrent=2",
                           f"run.dir={sweep_dir}", *TINY, "tracking.wandb=off"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "shared stages: base, sft" in proc.stdout
    trials = sorted((sweep_dir / "trials").iterdir())
    assert [t.name for t in trials] == [f"trial-{i:03d}" for i in range(4)]
    betas = []
    sft_bytes = set()
    for trial in trials:
        stages = manifest(trial)["stages"]
        assert stages["base"]["reused_from"] and stages["sft"]["reused_from"]
        assert stages["dpo"]["reused_from"] is None and stages["dpo"]["status"] == "done"
        betas.append(stages["dpo"]["config"]["trainer.dpo"]["beta"])
        sft_bytes.add((trial / "sft" / "adapter" / "adapter_model.safetensors").read_bytes())
    assert betas == [0.05, 0.1, 0.2, 0.5]
    assert len(sft_bytes) == 1  # one SFT, computed once
    rows = (sweep_dir / "results.csv").read_text().splitlines()
    assert rows[0].startswith("trial,trainer.dpo.beta,win_rate") and len(rows) == 5
    results = (sweep_dir / "results.md").read_text()
    best = max((json.loads((t / "eval" / "result.json").read_text())["win_rate"], t.name) for t in trials)
    assert "Best trial (max win_rate)" in results and best[1] in results.split("Best trial")[1]
    assert (sweep_dir / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_arm_sweep_puts_several_methods_on_one_frontier(tmp_path, env):
    """Arms of different pipelines: base and SFT computed once for all, the PPO arm's reward model once for its
    two trials, every trial's eval point in results.csv and one frontier.png."""
    import shutil

    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    (configs / "sweep" / "methods.yaml").write_text(
        "name: methods\nmetric: policy_score_mean\narms:\n"
        "  dpo: {pipeline: dpo, parameters: {trainer.dpo.rounds: [2], trainer.dpo.beta: [0.1, 0.5]}}\n"
        "  ppo: {pipeline: ppo, parameters: {trainer.ppo.kl.target: [1.0, 4.0]}}\n"
        "  grpo: {pipeline: grpo, parameters: {trainer.grpo.kl.coef: [0.05]}}\n")
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "align.sweep", "sweep=methods", f"run.dir={sweep_dir}", *TINY,
                           "tracking.wandb=off"], cwd=REPO, env={**env, "ALIGN_CONFIG_DIR": str(configs)},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "shared stages: base, sft; arm ppo also shares: rm" in proc.stdout
    stages = {t.name: manifest(t)["stages"] for t in sorted((sweep_dir / "trials").iterdir())}
    assert list(stages) == [f"trial-{i:03d}" for i in range(5)]
    assert [list(s) for s in stages.values()] == [["base", "sft", "dpo", "eval"]] * 2 + \
        [["base", "sft", "rm", "ppo", "eval"]] * 2 + [["base", "sft", "grpo", "eval"]]
    for name, trial in stages.items():
        assert trial["base"]["reused_from"] and trial["sft"]["reused_from"], name
        assert trial["eval"]["status"] == "done" and trial["eval"]["reused_from"] is None, name
    assert stages["trial-002"]["rm"]["reused_from"] and stages["trial-003"]["rm"]["reused_from"]
    assert stages["trial-000"]["dpo"]["config"]["trainer.dpo"]["rounds"] == 2
    with (sweep_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["arm"] for r in rows] == ["dpo", "dpo", "ppo", "ppo", "grpo"]
    for row, name in zip(rows, stages):
        result = json.loads((sweep_dir / "trials" / name / "eval" / "result.json").read_text())
        assert float(row["kl_to_reference"]) == pytest.approx(result["kl_to_reference"], rel=1e-9)
        assert float(row["policy_score_mean"]) == pytest.approx(result["policy_score_mean"], rel=1e-9)
        assert int(row["wins"]) + int(row["ties"]) + int(row["losses"]) == result["prompts"] == 16
    results = (sweep_dir / "results.md").read_text()
    assert all(f"Best of arm {arm}" in results for arm in ("dpo", "ppo", "grpo"))
    assert (sweep_dir / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_offline_tracking_keeps_the_key_out(tmp_path, env):
    key = "align-test-key-" + secrets.token_hex(8)
    run_dir = tmp_path / "wb"
    proc = align_run(["ray.enabled=false", "tracking.wandb=auto", f"run.dir={run_dir}", "run.name=wbtest"],
                     {**env, "WANDB_MODE": "offline", "WANDB_API_KEY": key})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("base", "sft", "dpo", "eval"):
        runs = list((run_dir / stage / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"{stage}: {runs}"
    offenders = [p for p in run_dir.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert offenders == []
    assert key not in proc.stdout + proc.stderr


@pytest.mark.parametrize(("deepspeed", "quantization"), [("zero3", "none"), ("zero2_offload", "nf4")])
def test_two_ray_train_workers_match_one_process(deepspeed, quantization, tmp_path, env):
    """pipeline=dpo with SFT and DPO on 2 Ray Train workers (8 rows per rank) against one plain process with 16
    rows per step: the same data, so the same adapters up to float noise. ZeRO-3: the adapter is gathered whole,
    never the empty shards; ZeRO-2 with offload on an NF4 base: QLoRA, the 4-bit base replicated on each rank."""
    env = {**env, "DS_ACCELERATOR": "cpu"}
    quantized = f"model.quantization={quantization}"
    workers = align_run([f"deepspeed={deepspeed}", "resources.num_workers=2", quantized,
                         f"run.dir={tmp_path / 'workers'}"], env)
    assert workers.returncode == 0, (workers.stdout + workers.stderr)[-4000:]
    single = align_run(["ray.enabled=false", "trainer.sft.micro_batch_size=16", "trainer.dpo.micro_batch_size=16",
                        quantized, f"run.dir={tmp_path / 'single'}"], env)
    assert single.returncode == 0, single.stderr[-3000:]
    stages = manifest(tmp_path / "workers")["stages"]
    assert [stages[s]["status"] for s in ("base", "sft", "dpo", "eval")] == ["done"] * 4
    for stage in ("sft", "dpo"):
        a, b = adapter_tensors(tmp_path / "workers", stage), adapter_tensors(tmp_path / "single", stage)
        assert a.keys() == b.keys() and len(a) > 0
        for name in a:
            assert a[name].shape == b[name].shape and a[name].numel() > 0, name
            assert (a[name] - b[name]).abs().max() < 1e-4, (stage, name)


def _logged_past_checkpoint(stage_dir, checkpoints, minimum: int) -> bool:
    """True when the newest checkpoint is at step >= ``minimum`` and metrics.jsonl has a training step after it."""
    saved = [int(p.name[5:]) for p in checkpoints.glob("step-*") if p.name[5:].isdigit()]
    if not saved or max(saved) < minimum:
        return False
    path = stage_dir / "metrics.jsonl"
    lines = path.read_text().splitlines()[:-1] if path.exists() else []  # the last line may be half written
    logged = [json.loads(line)["step"] for line in lines if '"train/loss"' in line]
    return bool(logged) and max(logged) > max(saved)


def test_a_dead_stage_worker_is_retried_by_ray_and_resumes(tmp_path, env):
    """kill -9 the Ray worker process running DPO (not the driver): Ray restarts the task (resources.max_retries)
    and the new attempt resumes from the stage's last checkpoint, ending with the adapter of an uninterrupted run."""
    dpo = ["trainer.dpo.max_steps=600", "trainer.dpo.save_every=20", "resources.max_retries=1"]
    straight = align_run([*dpo, "ray.enabled=false", f"run.dir={tmp_path / 'straight'}"], env)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "retried"
    proc = subprocess.Popen([sys.executable, "-m", "align.run", *TINY, *dpo, f"run.dir={run_dir}"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        # kill once a checkpoint at step >= 40 exists and a later step has been logged, so the retry must replay
        # logged steps (a kill right after a checkpoint and before the next log line would leave nothing to replay)
        checkpoints = run_dir / "dpo" / "checkpoints"
        deadline = time.time() + 300
        while time.time() < deadline and not _logged_past_checkpoint(run_dir / "dpo", checkpoints, 40):
            assert proc.poll() is None, "the run ended before its worker could be killed"
            time.sleep(0.05)
        worker = subprocess.run(["pgrep", "-f", "ray::align:dpo"], capture_output=True, text=True).stdout.split()
        assert len(worker) == 1, worker
        os.kill(int(worker[0]), signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    stages = manifest(run_dir)["stages"]
    assert [stages[s]["status"] for s in ("base", "sft", "dpo", "eval")] == ["done"] * 4
    a, b = adapter_tensors(tmp_path / "straight", "dpo"), adapter_tensors(run_dir, "dpo")
    for name in a:
        assert (a[name] == b[name]).all(), name
    metrics = [json.loads(line) for line in (run_dir / "dpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "train/loss" in m]
    assert steps[0] == 1 and steps.count(1) == 1  # the retry did not start over
    assert any(b <= a for a, b in zip(steps, steps[1:]))  # it went back to the last checkpoint


def _model_dir(run_dir: Path) -> Path:
    return Path(manifest(run_dir)["stages"]["base"]["artifacts"]["model_dir"])


def _peft_logit_gap(run_dir: Path, adapter_dir: Path) -> float:
    """Load ``adapter_dir`` with the real peft onto the run's base (a transformers directory) and return the largest
    logit difference from align's own loading of it."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from align.adapters import AdapterModel

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(_model_dir(run_dir)),
                                                adapter_dir).eval()(ids).logits
        ours = AdapterModel(AutoModelForCausalLM.from_pretrained(_model_dir(run_dir)).eval())
        ours.load_adapter(adapter_dir, "policy")
        with ours.use("policy"):
            return (theirs - ours(ids).logits).abs().max().item()


RL_ON_WORKERS = {  # the one-process run's overrides: the global batch of two workers in one process
    "ppo": ["trainer.sft.micro_batch_size=16", "trainer.rm.micro_batch_size=16",
            "trainer.ppo.rollout.prompts_per_step=16"],
    "grpo": ["trainer.sft.micro_batch_size=16", "trainer.grpo.rollout.prompts_per_step=8",
             "trainer.grpo.minibatch_size=32"],
}


@pytest.mark.parametrize(("pipeline", "deepspeed", "quantization"), [
    ("ppo", "zero2_offload", "nf4"), ("grpo", "zero3", "none")])
def test_rl_pipeline_on_two_ray_train_workers(pipeline, deepspeed, quantization, tmp_path, env):
    """pipeline=ppo (SFT, RM, PPO) and pipeline=grpo (SFT, GRPO) with every training stage on 2 Ray Train workers,
    against one plain process with the global batch of both (per rank: 8 SFT/RM rows, PPO 8 prompts, GRPO 4 prompts
    x 4 samples; generation in batches of 8, which divides each rank's share, so both runs sample the same). The
    adapters agree up to fp32 noise that Adam amplifies (test_rl_multirank.py), they are whole (never ZeRO-3's
    empty shards), and the real peft loads the policy with align's logits."""
    env = {**env, "DS_ACCELERATOR": "cpu"}
    common = [f"pipeline={pipeline}", f"model.quantization={quantization}",
              f"trainer.{pipeline}.rollout.generation_batch_size=8"]
    workers = align_run([*common, f"deepspeed={deepspeed}", "resources.num_workers=2",
                         f"run.dir={tmp_path / 'workers'}"], env)
    assert workers.returncode == 0, (workers.stdout + workers.stderr)[-4000:]
    single = align_run([*common, *RL_ON_WORKERS[pipeline], "ray.enabled=false", f"run.dir={tmp_path / 'single'}"],
                       env)
    assert single.returncode == 0, single.stderr[-3000:]
    stages = manifest(tmp_path / "workers")["stages"]
    assert all(stages[s]["status"] == "done" for s in stages), stages
    for stage in [s for s in ("sft", "rm", pipeline) if s in stages]:
        a, b = adapter_tensors(tmp_path / "workers", stage), adapter_tensors(tmp_path / "single", stage)
        assert a.keys() == b.keys() and len(a) > 0
        differences = [(a[k] - b[k]).abs().flatten() for k in a if a[k].numel() > 0]
        assert len(differences) == len(a), f"{stage}: empty tensors saved"
        differences = torch.cat(differences)
        assert differences.median() < 2e-6 and differences.max() < 2e-4, (stage, differences.median(),
                                                                          differences.max())
    # peft loads the policy onto the base directory (the NF4 run's adapter too: its base is that directory, quantized)
    assert _peft_logit_gap(tmp_path / "workers", tmp_path / "workers" / pipeline / "adapter") < 1e-4
