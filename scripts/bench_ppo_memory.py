"""Peak memory (RSS) of one PPO iteration with the four roles on ONE shared base vs four separate model copies.

Each measurement runs in its own process (peak RSS is per process): build the model(s), run one PPO iteration
(rollout, scoring by every role, GAE, one epoch of minibatch updates of the policy and value adapters), report
resident memory (VmRSS) before and after building, the peak while building (for NF4 it includes the fp32 model
that is built before quantization) and the peak during the iteration (VmHWM, reset after building; getrusage's
ru_maxrss is not used: it survives fork + exec and would report the parent's peak). Modes:
    shared      one base, four roles as adapters (+ heads), through align's PPO trainer (what align runs)
    shared-nf4  the same with the base quantized to 4-bit NF4
    separate    four copies of the base, one per role, each with its adapter (what OpenRLHF / DeepSpeed-Chat hold)
``shared-step`` runs the exact iteration of ``separate`` on one shared base, to compare like with like.

    python scripts/bench_ppo_memory.py [--hidden 1024 --layers 8 --vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from align.adapters import AdapterModel, LoraConfig
from align.algos import RunningMoments, ppo_policy_loss, ppo_value_loss
from align.config.rl import RLConfig, RolloutConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.models import quantize_linear_layers, tiny_llama
from align.models.forward import response_logps_and_entropy, response_token_logps
from align.models.heads import ScalarHead
from align.models.roles import POLICY, REFERENCE, REWARD, VALUE, Role
from align.trainers.ppo import build_ppo_trainer, ppo_advantages
from align.trainers.rl_common import Experience, reward_model_scores, sequence_values, shape_rewards
from align.trainers.rollout import generate_rollout

MODES = ("shared", "shared-nf4", "shared-step", "separate")
LORA = LoraConfig(r=16, lora_alpha=32)


class Tok:
    pad_token_id, eos_token_id = 0, 2


def base(args, quantization: str = "none"):
    model = tiny_llama(seed=0, vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                       num_layers=args.layers, num_heads=16, num_kv_heads=8)
    return quantize_linear_layers(model, "nf4") if quantization == "nf4" else model


def prompts(args) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [{"prompt_ids": [1, *torch.randint(3, args.vocab, (args.prompt_len,), generator=gen).tolist()]}
            for _ in range(args.prompts)]


def rl_config(args) -> RLConfig:
    return RLConfig(rollout=RolloutConfig(prompts_per_step=args.prompts, max_new_tokens=args.new_tokens),
                    ppo_epochs=1, minibatch_size=args.minibatch)


def prepare_trainer(args, quantization: str):
    """Build the one-base model and PPO trainer; returns the iteration to measure."""
    model = AdapterModel(base(args, quantization))
    model.add_adapter("sft", LORA, trainable=False)
    model.add_adapter("reward", LORA, trainable=False)
    head = ScalarHead(args.hidden, "score")
    trainer = build_ppo_trainer(model, prompts(args), Tok(), rl_config(args),
                                LoopConfig(max_steps=1, progress=False), OptimizerConfig(lr=1e-5), args.tmp,
                                reward_head=head)
    trainer.model.eval()
    return trainer.iteration


def role_models(args, separate: bool) -> dict[str, AdapterModel]:
    """The model each role runs on: four copies of the base, or one object for all four."""
    names = {POLICY: "policy", REFERENCE: "sft", REWARD: "reward", VALUE: "value"}
    shared = None if separate else AdapterModel(base(args))
    models = {}
    for role, adapter in names.items():
        model = AdapterModel(base(args)) if separate else shared
        model.add_adapter(adapter, LORA, trainable=role in (POLICY, VALUE))
        models[role] = model.eval()
    return models


def prepare_step(args, separate: bool):
    """Build the role -> model map (shared or separate); returns one PPO iteration written against it, the same
    work either way."""
    models, cfg = role_models(args, separate), rl_config(args)
    return lambda: run_step(models, cfg, args)


def run_step(models: dict[str, AdapterModel], cfg: RLConfig, args) -> None:
    roles = {POLICY: Role(POLICY, "policy", "lm", True), REFERENCE: Role(REFERENCE, "sft", "lm", False),
             REWARD: Role(REWARD, "reward", "score", False), VALUE: Role(VALUE, "value", "value", True)}
    value_head, reward_head = ScalarHead(args.hidden, "value"), ScalarHead(args.hidden, "score")
    rollout = generate_rollout(models[POLICY], "policy", [r["prompt_ids"] for r in prompts(args)], cfg.rollout, 2, 0)
    batch = rollout.batch()
    with torch.no_grad():
        with models[POLICY].use("policy"):
            old, entropy, mask = response_logps_and_entropy(models[POLICY], batch)
        with models[REFERENCE].use("sft"):
            ref, _ = response_token_logps(models[REFERENCE], batch)
        values = sequence_values(models[VALUE], roles[VALUE], value_head, batch)
        scores = reward_model_scores(models[REWARD], roles[REWARD], reward_head, batch, standardize=False)
    exp = Experience(rollout, mask, old, ref, entropy, values, scores)
    shape_rewards(exp, cfg, RunningMoments())
    ppo_advantages(exp, 0.05, cfg)
    params = [*models[POLICY].adapter_parameters("policy"), *models[VALUE].adapter_parameters("value"),
              *value_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    for rows in torch.arange(len(exp)).split(cfg.minibatch_size):
        mb, width = rollout.batch(rows), int(rollout.attention_mask[rows].sum(1).max()) - 1
        with models[POLICY].use("policy"):
            logps, m = response_token_logps(models[POLICY], mb)
        loss, _ = ppo_policy_loss(logps, old[rows, :width], exp.advantages[rows, :width], m, cfg.clip_eps)
        new_values = sequence_values(models[VALUE], roles[VALUE], value_head, mb)
        vf, _ = ppo_value_loss(new_values, values[rows, :width], exp.returns[rows, :width], m, cfg.value_clip_eps)
        (loss + cfg.vf_coef * vf).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def proc_status_mib(key: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc/self/status."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(mode: str, args) -> None:
    torch.manual_seed(0)
    before = proc_status_mib("VmRSS")
    start = time.perf_counter()
    if mode in ("shared", "shared-nf4"):
        step = prepare_trainer(args, "nf4" if mode == "shared-nf4" else "none")
    else:
        step = prepare_step(args, separate=mode == "separate")
    built, build_peak = proc_status_mib("VmRSS"), proc_status_mib("VmHWM")
    reset_peak()
    step()
    print(json.dumps({"mode": mode, "rss_before_build_mib": round(before), "rss_after_build_mib": round(built),
                      "peak_during_iteration_mib": round(proc_status_mib("VmHWM")),
                      "peak_while_building_mib": round(build_peak), "seconds": round(time.perf_counter() - start, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, help="measure one mode in this process (used internally)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--minibatch", type=int, default=4)
    parser.add_argument("--tmp", default="/tmp/bench-ppo-memory")
    args = parser.parse_args()
    if args.mode:
        measure(args.mode, args)
        return
    with torch.device("meta"):  # count without allocating: this process's memory is inherited by nothing here
        n = sum(p.numel() for p in base(args).parameters())
    print(f"base: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: {n / 1e6:.1f}M parameters, "
          f"{n * 4 / 2**20:.0f} MiB in fp32; {args.prompts} prompts of {args.prompt_len} tokens, {args.new_tokens} "
          f"new tokens, minibatch {args.minibatch}, LoRA r={LORA.r} on all linear layers")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "mode"]
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--mode", mode, *flags], capture_output=True, text=True)
        print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"{mode}: failed\n{out.stderr[-2000:]}")


if __name__ == "__main__":
    main()
