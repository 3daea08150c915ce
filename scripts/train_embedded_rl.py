"""PPO (learned reward model), GRPO and RLOO (ground-truth scorer) on the embedded task, reporting the acceptance
figures: ground-truth win-rate of the RL policy's samples against the SFT policy's on the held-out prompts, mean
scores, the KL to the SFT reference on those samples, and run times.

Starts from the SFT and reward adapters that scripts/train_embedded.py saves:
    python scripts/train_embedded.py --out runs/embedded
    python scripts/train_embedded_rl.py --from runs/embedded --out runs/embedded-rl [--algos ppo grpo] [--nf4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from align.adapters import AdapterModel
from align.config import DataConfig
from align.config.rl import KLConfig, RLConfig, RolloutConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.data import prepare_prompts
from align.models.embedded import build_embedded_base
from align.models.forward import response_token_logps
from align.models.generate import encode_prompts
from align.models.heads import ScalarHead
from align.models.loading import load_base
from align.tracking import Tracker
from align.trainers.grpo import build_grpo_trainer
from align.trainers.ppo import build_ppo_trainer
from align.trainers.rloo import build_rloo_trainer
from align.trainers.rollout import generate_rollout
from reward.evaluate import compare
from reward.functions import GroundTruthReward

BUILDERS = {"ppo": build_ppo_trainer, "grpo": build_grpo_trainer, "rloo": build_rloo_trainer}
EVAL_ROLLOUT = RolloutConfig(max_new_tokens=64, temperature=1.0, generation_batch_size=100)


# The settings measured in docs/trainers.md: PPO on the learned reward model, GRPO / RLOO on the ground truth.
PRESETS = {
    "ppo": {"steps": 150, "prompts": 64, "group_size": 1, "epochs": 4, "minibatch": 16, "lr": 5e-4, "kl_coef": 0.1,
            "kl_target": 4.0},
    "grpo": {"steps": 100, "prompts": 16, "group_size": 4, "epochs": 4, "minibatch": 16, "lr": 5e-4, "kl_coef": 0.05,
             "kl_target": 0.0},
    "rloo": {"steps": 100, "prompts": 16, "group_size": 4, "epochs": 4, "minibatch": 16, "lr": 5e-4, "kl_coef": 0.05,
             "kl_target": 0.0},
}


def settings(algo: str, args) -> dict:
    """The algorithm's preset, with every flag given on the command line taking precedence."""
    return {key: getattr(args, key) if getattr(args, key) is not None else value
            for key, value in PRESETS[algo].items()}


def rl_config(algo: str, s: dict) -> RLConfig:
    rollout = RolloutConfig(prompts_per_step=s["prompts"], group_size=s["group_size"], max_new_tokens=64,
                            unfinished_penalty=1.0)
    if algo == "ppo":  # k1 KL penalty in the per-token reward, value model started from the reward model
        # kl_target > 0: adaptive coefficient (Ziegler et al.), reacting over ten iterations' samples
        kl = KLConfig(coef=s["kl_coef"], adaptive=s["kl_target"] > 0, target=s["kl_target"] or 6.0,
                      horizon=10.0 * s["prompts"])
        return RLConfig(algo="ppo", rollout=rollout, kl=kl, ppo_epochs=s["epochs"], minibatch_size=s["minibatch"])
    # GRPO: k3 KL in the loss, as the paper; RLOO: KL subtracted from the reward, as the paper
    kl = KLConfig(coef=s["kl_coef"], estimator="k3", in_loss=True) if algo == "grpo" else KLConfig(coef=s["kl_coef"])
    return RLConfig(algo=algo, reward_adapter=None, rollout=rollout, kl=kl, ppo_epochs=s["epochs"],
                    minibatch_size=s["minibatch"])


def load_roles(seed_dir: Path, base_dir: str | None, quantization: str):
    """The tiny base (optionally NF4) with the frozen 'sft' and 'reward' adapters and the reward head. ``base_dir``:
    a built base (its ``model/`` and ``data/``); None builds or reuses the default one."""
    model_dir, data_dir = ((Path(base_dir) / "model", Path(base_dir) / "data") if base_dir else
                           (lambda info: (info.model_dir, info.data_dir))(build_embedded_base()))
    base, tok = load_base(model_dir, quantization=quantization)
    model = AdapterModel(base)
    model.load_adapter(seed_dir / "sft" / "adapter", "sft")
    model.load_adapter(seed_dir / "reward" / "adapter", "reward")
    return model, tok, ScalarHead.load(seed_dir / "reward" / "adapter"), data_dir


@torch.no_grad()
def evaluate(model: AdapterModel, adapter: str, tok, prompt_ids: list[list[int]], seed: int = 1) -> dict:
    """Ground-truth scores of one sample per held-out prompt from ``adapter``, and the KL(adapter || sft) of those
    samples (k1, nats per response)."""
    torch.manual_seed(seed)
    rollout = generate_rollout(model, adapter, prompt_ids, EVAL_ROLLOUT, tok.eos_token_id, tok.pad_token_id)
    rollout.decode(tok)
    batch = rollout.batch()
    with model.use(adapter):
        logps, mask = response_token_logps(model, batch)
    with model.use("sft"):
        ref_logps, _ = response_token_logps(model, batch)
    return {"scores": GroundTruthReward()(rollout.prompts, rollout.responses),
            "kl": ((logps - ref_logps) * mask).sum(1).mean().item(),
            "length": rollout.response_lengths.float().mean().item(),
            "finished": rollout.finished.float().mean().item(), "example": rollout.responses[0]}


def run(algo: str, args, quantization: str = "none") -> dict:
    model, tok, head, data = load_roles(Path(args.seed_dir), args.base, quantization)
    limits = {"max_length": 128, "max_prompt_length": 64, "lint_samples": 0}
    prompts = prepare_prompts(DataConfig(train=str(data / "prompts.jsonl"), **limits), tok)
    eval_prompts = [json.loads(line)["prompt"] for line in (data / "eval_prompts.jsonl").open()][: args.eval_prompts]
    eval_ids = encode_prompts(tok, eval_prompts)
    s = settings(algo, args)
    if quantization != "none" and args.nf4_steps:
        s["steps"] = args.nf4_steps
    cfg = rl_config(algo, s)
    out = Path(args.out) / (algo if quantization == "none" else f"{algo}-{quantization}")
    loop = LoopConfig(max_steps=s["steps"], save_every=args.save_every, seed=args.seed, keep_checkpoints=1000)
    optim = OptimizerConfig(lr=s["lr"], schedule="constant", warmup_steps=5)
    reward = {"reward_head": head} if algo == "ppo" else {"reward_fn": GroundTruthReward()}
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with Tracker(out) as tracker:
        trainer = BUILDERS[algo](model, prompts, tok, cfg, loop, optim, out, tracker=tracker, **reward)
        last = trainer.fit()
    seconds = time.perf_counter() - start
    model.save_adapter("policy", out / "adapter")
    sft, policy = evaluate(model, "sft", tok, eval_ids), evaluate(model, "policy", tok, eval_ids)
    result = {"algo": algo, "quantization": quantization, "reward": "reward model" if algo == "ppo" else
              "ground truth", "train_seconds": round(seconds, 1), **s,
              "win_rate_vs_sft": compare(policy["scores"], sft["scores"]).win_rate,
              "score_policy": policy["scores"].mean().item(), "score_sft": sft["scores"].mean().item(),
              "eval_kl_to_sft": policy["kl"], "train_kl_last": last.get("kl"),
              "train_score_last": last.get("reward/score_mean"), "length_policy": policy["length"],
              "length_sft": sft["length"], "finished_policy": policy["finished"], "example": policy["example"]}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="seed_dir", default="runs/embedded",
                        help="output of scripts/train_embedded.py (sft/adapter, reward/adapter)")
    parser.add_argument("--out", default="runs/embedded-rl")
    parser.add_argument("--base", default=None, help="a built embedded base directory (default: build or reuse)")
    parser.add_argument("--algos", nargs="*", default=["ppo", "grpo"], choices=sorted(BUILDERS))
    parser.add_argument("--nf4", action="store_true", help="also run PPO on a 4-bit NF4 base")
    for flag, kind in (("steps", int), ("prompts", int), ("group-size", int), ("epochs", int), ("minibatch", int),
                       ("lr", float), ("kl-coef", float), ("kl-target", float)):
        parser.add_argument(f"--{flag}", type=kind, default=None, help="overrides the algorithm's preset")
    parser.add_argument("--nf4-steps", type=int, default=None, help="iterations of the NF4 run (default: preset)")
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--eval-prompts", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = [run(algo, args) for algo in args.algos]
    if args.nf4:
        results.append(run("ppo", args, "nf4"))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
