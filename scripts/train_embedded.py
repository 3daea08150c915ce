"""SFT -> reward model -> DPO on the embedded task, in one process, reporting the acceptance figures.

Until the Ray pipeline (`python -m align.run`) lands this is the way to run the trainers end to end:
    python scripts/train_embedded.py [--out runs/embedded] [--sft-steps 300] [--rm-steps 3000] [--dpo-steps 400]

The DPO pairs follow the DPO paper's IMDb protocol: four continuations per prompt sampled from the SFT policy, the
best and the worst under the hidden ground-truth scorer (standing in for human labellers) become chosen and
rejected (`--pairs offline` uses the task's generator-made preferences.jsonl instead).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from align.adapters import AdapterModel, LoraConfig
from align.config import DataConfig
from align.config.methods import DPOConfig, RewardConfig, SFTConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.data import SFTCollator, prepare_preferences, prepare_sft
from align.models.embedded import build_embedded_base
from align.models.generate import sample
from align.models.loading import load_base
from align.tracking import Tracker
from align.trainers.dpo import build_dpo_trainer
from align.trainers.reward_model import (
    build_reward_trainer,
    fit_statistics,
    new_reward_head,
    pairwise_accuracy,
)
from align.trainers.sft import build_sft_trainer, heldout_nll
from reward.evaluate import compare
from reward.functions import GroundTruthReward
from reward.pairs import sample_preference_pairs, write_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/embedded")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--rm-steps", type=int, default=3000)
    parser.add_argument("--dpo-steps", type=int, default=400)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--dpo-lr", type=float, default=1e-3)
    parser.add_argument("--rpo-alpha", type=float, default=1.0)
    parser.add_argument("--pairs", choices=("onpolicy", "offline"), default="onpolicy")
    parser.add_argument("--pair-prompts", type=int, default=2000)
    parser.add_argument("--eval-prompts", type=int, default=300)
    args = parser.parse_args()
    out = Path(args.out)
    results: dict = {}
    t0 = time.perf_counter()

    base_info = build_embedded_base()
    base, tok = load_base(base_info.model_dir)
    model = AdapterModel(base)
    data = base_info.data_dir
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    limits = {"max_length": 128, "max_prompt_length": 64}

    # ---- SFT
    sft_rows = prepare_sft(DataConfig(train=str(data / "sft.jsonl"), **limits), tok)
    sft_train, sft_eval = sft_rows.select(range(len(sft_rows) - 200)), sft_rows.select(range(len(sft_rows) - 200, len(sft_rows)))
    model.add_adapter("sft", lora)
    sft_cfg = SFTConfig()
    results["sft/eval_nll_before"] = heldout_nll(model, sft_eval, SFTCollator(tok.pad_token_id), sft_cfg, "sft")
    start = time.perf_counter()
    with Tracker(out / "sft") as tracker:
        build_sft_trainer(model, sft_train, sft_eval, tok.pad_token_id, sft_cfg,
                          LoopConfig(max_steps=args.sft_steps, micro_batch_size=16, eval_every=100),
                          OptimizerConfig(lr=2e-3, warmup_steps=20), out / "sft", tracker).fit()
    results["sft/eval_nll_after"] = heldout_nll(model, sft_eval, SFTCollator(tok.pad_token_id), sft_cfg, "sft")
    results["sft/seconds"] = round(time.perf_counter() - start, 1)
    model.freeze("sft")
    model.save_adapter("sft", out / "sft" / "adapter")

    # ---- reward model: its own adapter + a scalar head
    prefs = prepare_preferences(DataConfig(train=str(data / "preferences.jsonl"), **limits), tok)
    prefs_clean = prepare_preferences(DataConfig(train=str(data / "preferences_eval.jsonl"), **limits), tok)
    noisy_eval = prefs.select(range(len(prefs) - 500, len(prefs)))
    prefs_train = prefs.select(range(len(prefs) - 500))
    model.add_adapter("reward", LoraConfig(r=32, lora_alpha=64, target_modules="all-linear"))
    head = new_reward_head(model)
    rm_cfg = RewardConfig()
    start = time.perf_counter()
    with Tracker(out / "reward") as tracker:
        build_reward_trainer(model, head, prefs_train, prefs_clean, tok.pad_token_id, rm_cfg,
                             LoopConfig(max_steps=args.rm_steps, micro_batch_size=16, eval_every=100),
                             OptimizerConfig(lr=1e-3, warmup_steps=20), out / "reward", tracker).fit()
    from align.data import PreferenceCollator
    collate = PreferenceCollator(tok.pad_token_id)
    model.eval()
    results["rm/accuracy_clean"] = pairwise_accuracy(model, head, prefs_clean, collate, rm_cfg)["accuracy"]
    results["rm/accuracy_noisy_heldout"] = pairwise_accuracy(model, head, noisy_eval, collate, rm_cfg)["accuracy"]
    fit_statistics(model, head, prefs_train, collate, rm_cfg)
    results["rm/seconds"] = round(time.perf_counter() - start, 1)
    model.freeze("reward")
    model.save_adapter("reward", out / "reward" / "adapter")
    head.save(out / "reward" / "adapter")

    # ---- DPO (policy = copy of SFT, reference = frozen SFT on the same base)
    start = time.perf_counter()
    dpo_train = prefs_train
    if args.pairs == "onpolicy":
        prompts = [json.loads(line)["prompt"] for line in (data / "prompts.jsonl").open()][: args.pair_prompts]
        rows = sample_preference_pairs(model, "sft", tok, prompts, GroundTruthReward(), k=4, seed=11)
        path = write_jsonl(rows, out / "dpo" / "pairs.jsonl")
        dpo_train = prepare_preferences(DataConfig(train=str(path), on_bad_rows="skip", **limits), tok)
        results["dpo/pairs"] = len(dpo_train)
    dpo_cfg = DPOConfig(beta=args.beta, rpo_alpha=args.rpo_alpha)
    with Tracker(out / "dpo") as tracker:
        build_dpo_trainer(model, dpo_train, prefs_clean, tok.pad_token_id, dpo_cfg,
                          LoopConfig(max_steps=args.dpo_steps, micro_batch_size=16, eval_every=100),
                          OptimizerConfig(lr=args.dpo_lr, warmup_steps=10), out / "dpo", tracker).fit()
    results["dpo/seconds"] = round(time.perf_counter() - start, 1)
    model.save_adapter("policy", out / "dpo" / "adapter")

    # ---- evaluation: sampled continuations of held-out prompts, scored by the hidden ground truth
    prompts = [json.loads(line)["prompt"] for line in (data / "eval_prompts.jsonl").open()][: args.eval_prompts]
    scorer = GroundTruthReward()
    scores = {}
    for name in (None, "sft", "policy"):
        responses = sample(model, name, tok, prompts, max_new_tokens=64, seed=1)
        scores[name or "base"] = scorer(prompts, responses)
    results["eval/dpo_vs_sft"] = str(compare(scores["policy"], scores["sft"]))
    results["eval/sft_vs_base"] = str(compare(scores["sft"], scores["base"]))
    results["eval/win_rate_dpo_vs_sft"] = compare(scores["policy"], scores["sft"]).win_rate
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(results, indent=2))
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
