"""Build (or reuse) the embedded task's tiny base and report its figures.

Prints the build time and held-out perplexity next to the uniform and unigram baselines, the split sizes, and the
ground-truth scorer's spread on continuations sampled from the base. Usage:
    python scripts/embedded_task_report.py [--samples 256] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.models.embedded import build_embedded_base
from reward.functions import GroundTruthReward


@torch.no_grad()
def sample_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=max_new_tokens,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--cache", default=None, help="cache root (default: $ALIGN_CACHE or ~/.cache/align)")
    args = parser.parse_args()
    base = build_embedded_base(cache_root=args.cache)
    print(f"base: {base.model_dir}")
    print(json.dumps(base.report, indent=2))
    sizes = {p.stem: sum(1 for _ in p.open()) for p in sorted(base.data_dir.glob("*.jsonl"))}
    print("splits:", sizes)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base.model_dir)
    prompts = [json.loads(line)["prompt"] for line in base.data_dir.joinpath("eval_prompts.jsonl").open()]
    prompts = (prompts * (args.samples // len(prompts) + 1))[: args.samples]
    responses = []
    for i in range(0, len(prompts), 64):
        responses += sample_continuations(model, tokenizer, prompts[i:i + 64])
    scores = GroundTruthReward()(prompts, responses).tolist()
    q = statistics.quantiles(scores, n=10)
    print(f"ground-truth score of {len(scores)} base samples: mean {statistics.mean(scores):+.3f} "
          f"std {statistics.pstdev(scores):.3f} p10 {q[0]:+.3f} p50 {q[4]:+.3f} p90 {q[8]:+.3f}; "
          f"> +0.5: {sum(s > 0.5 for s in scores) / len(scores):.0%}, < -0.5: {sum(s < -0.5 for s in scores) / len(scores):.0%}")
    for prompt, response, s in list(zip(prompts, responses, scores))[:3]:
        print(f"  [{s:+.2f}] {prompt} || {response}")


if __name__ == "__main__":
    main()
