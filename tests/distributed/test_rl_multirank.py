"""PPO, GRPO and RLOO on two gloo ranks of DeepSpeed against one plain PyTorch process with the whole global batch,
launched with torchrun running ``run_rl.py``; and a kill -9 of rank 0 mid-run, resumed on two ranks.

What makes the two runs comparable: the rollouts are seeded by (seed, iteration, generation batch), so both sample
the same responses; whitening, reward normalisation and the KL controller use global statistics (all-reduced); each
rank scales its token-mean loss by its share of the global tokens, and DeepSpeed averages the gradients. What is
left is the order of fp32 sums (the gradient of a half batch averaged over two ranks instead of one sum over the
whole batch, DeepSpeedCPUAdam instead of torch's AdamW), and Adam's amplification of it: a weight whose first
gradient is fp32 noise (measured: -1.4e-7 where its tensor's median is 3.3e-3) still takes a step of up to lr = 1e-2
in a direction the noise decides, and the model carries the difference on. Measured after 3 iterations x 2 epochs,
on LoRA weights that moved by ~0.04: median difference 7e-7, largest 9e-5 (GRPO; 4.8e-5 RLOO), 0.2% of the weights
beyond 1e-5; the KL of the last rollout within 3.3e-5 nats, its mean gradient norm within 2.3e-4 (relative). One rank of DeepSpeed against plain PyTorch on the same
half batch: below 6e-7 everywhere. Without the ranks' token shares in the loss the same comparison is off by 0.04
(the responses end at different lengths). Hence: median below 2e-6, largest below 2e-4 (2% of one Adam step), KL
within 1e-4 nats, gradient norms within 1e-3.

Slow: about 25 s per torchrun launch here (three launches per case)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import free_port
from .tiny_rl import STEPS, assert_close_after_adam, rl_trainer

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = "adapter_model.safetensors"


def launch(config: Path, out: Path, algo: str, quantization: str, die_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # torchrun sets them for each rank
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "tests/distributed/run_rl.py"),
               str(config), str(out), algo, quantization, *([str(die_at)] if die_at else [])]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def ds_config(tmp_path: Path, name: str) -> Path:
    config = json.loads((ROOT / f"configs/deepspeed/{name}.json").read_text())
    if config["zero_optimization"]["stage"] == 3:  # partition even these tiny tensors: a save must gather them
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{STEPS:06d}" / "trainable.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize(("algo", "name", "quantization"), [
    ("ppo", "zero2_offload", "nf4"), ("grpo", "zero3", "none"), ("rloo", "zero3_offload", "none")])
def test_two_ranks_match_one_process_and_resume_after_kill(algo, name, quantization, tmp_path):
    config = ds_config(tmp_path, name)
    straight = launch(config, tmp_path / "straight", algo, quantization)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-6000:]

    torch.manual_seed(0)
    single = rl_trainer(algo, tmp_path / "single", quantization)
    history = []
    iteration = single.iteration
    single.iteration = lambda: history.append(iteration()) or history[-1]
    single.fit()

    assert any(0 < h["rollout/finished"] < 1 for h in history)  # responses of several lengths: the token shares
    reports = [json.loads((tmp_path / "straight" / f"rank{r}.json").read_text()) for r in range(2)]
    stage = 3 if name.startswith("zero3") else 2
    assert {k: reports[0][k] for k in ("world_size", "zero_stage", "optimizer", "partitioned")} == {
        "world_size": 2, "zero_stage": stage,
        "optimizer": "DeepSpeedCPUAdam" if "offload" in name else "AdamW", "partitioned": stage == 3}
    assert reports[0]["history"] == reports[1]["history"]  # metrics are averaged over ranks: the same on both
    for step, (got, expected) in enumerate(zip(reports[0]["history"], history, strict=True), start=1):
        # the same rollouts scored the same; the global KL, norm and schedule
        for key in ("reward/score_mean", "reward/score_std", "rollout/response_length", "kl/coef", "lr"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), f"iteration {step}: {key}"
        assert got["kl"] == pytest.approx(expected["kl"], abs=1e-4), f"iteration {step}: kl"  # see the docstring
        assert got["grad_norm/0"] == pytest.approx(expected["grad_norm/0"], rel=1e-3), f"iteration {step}"

    ranks, one = final_tensors(tmp_path / "straight"), {k: v.detach() for k, v in single.params.items()}
    assert_close_after_adam(ranks, one)
    untrained = {k: v.detach() for k, v in rl_trainer(algo, tmp_path / "untrained", quantization).params.items()}
    assert max_difference(one, untrained) > 1e-3  # the weights moved: not a comparison of two untrained copies

    # the adapters saved from the shards: whole, and the trained weights
    adapter = load_file(str(tmp_path / "straight" / "adapter" / WEIGHTS))
    policy = {k: v for k, v in ranks.items() if k.startswith("policy.")}
    assert len(adapter) == len(policy) and all(v.numel() > 0 for v in adapter.values())
    assert sorted(round(v.abs().sum().item(), 4) for v in adapter.values()) == sorted(
        round(v.abs().sum().item(), 4) for v in policy.values())
    if algo == "ppo":
        assert (tmp_path / "straight" / "value" / WEIGHTS).is_file()

    # kill -9 of rank 0 at the start of the last iteration, then a fresh launch resumes on two ranks
    killed = launch(config, tmp_path / "resumed", algo, quantization, die_at=STEPS)
    assert killed.returncode != 0
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS - 1:06d}"
    resumed = launch(config, tmp_path / "resumed", algo, quantization)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    report = json.loads((tmp_path / "resumed" / "rank0.json").read_text())
    untimed = [{k: v for k, v in h.items() if not k.startswith("time/")}
               for h in (report["history"][-1], reports[0]["history"][-1])]
    assert len(report["history"]) == 1 and untimed[0] == untimed[1]  # the last iteration again, exactly
    assert max_difference(final_tensors(tmp_path / "resumed"), ranks) == 0.0
