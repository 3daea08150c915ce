"""The embedded task's data splits, written as ordinary JSONL so they go through the same loaders as user data.

pretrain.jsonl / pretrain_eval.jsonl   {"text"}                         plain reviews for the tiny base
sft.jsonl                              {"prompt", "completion"}         chat-formatted by the tokenizer's template
preferences.jsonl / preferences_eval.jsonl  {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
prompts.jsonl                          {"prompt"}                       for PPO / GRPO rollouts
eval_prompts.jsonl                     {"prompt"}                       held out: no prompt of any other split
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from align.config.embedded import EmbeddedTaskConfig

from .scorer import score
from .world import ReviewWorld

WORLD_VERSION = 2  # bump when the lexicon, grammar or scorer changes: it keys every cache


def preference_pair(world: ReviewWorld, rng: random.Random, temperature: float) -> dict:
    """Two continuations of one prompt with independent sentiments, labelled by a Bradley-Terry draw."""
    prompt = world.prompt(world.sentiment())
    a, b = world.response(world.sentiment()), world.response(world.sentiment())
    while b == a:
        b = world.response(world.sentiment())
    sa, sb = score(a), score(b)
    if temperature == 0:
        a_wins = sa > sb or (sa == sb and rng.random() < 0.5)
    else:
        a_wins = rng.random() < 1.0 / (1.0 + math.exp(-(sa - sb) / temperature))
    chosen, rejected = (a, b) if a_wins else (b, a)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "chosen_score": max(sa, sb) if a_wins == (sa >= sb) else min(sa, sb),
            "rejected_score": min(sa, sb) if a_wins == (sa >= sb) else max(sa, sb)}


def generate_splits(cfg: EmbeddedTaskConfig) -> dict[str, list[dict]]:
    """All splits, deterministic for ``cfg``. Each split has its own seeded stream, so changing one size does not
    change the others; evaluation prompts are kept disjoint from every training prompt."""
    def world(offset: int) -> ReviewWorld:
        return ReviewWorld(cfg.seed * 1000 + offset)

    splits: dict[str, list[dict]] = {}
    w = world(1)
    splits["pretrain"] = [{"text": f"{r.prompt} {r.response}"} for r in (w.review() for _ in range(cfg.n_pretrain))]
    w = world(2)
    splits["pretrain_eval"] = [{"text": f"{r.prompt} {r.response}"}
                               for r in (w.review() for _ in range(cfg.n_pretrain_eval))]
    w = world(3)
    splits["sft"] = [{"prompt": r.prompt, "completion": r.response} for r in (w.review() for _ in range(cfg.n_sft))]
    w, rng = world(4), random.Random(cfg.seed * 1000 + 40)
    splits["preferences"] = [preference_pair(w, rng, cfg.bt_temperature) for _ in range(cfg.n_preferences)]
    w, rng = world(5), random.Random(cfg.seed * 1000 + 50)
    splits["preferences_eval"] = [preference_pair(w, rng, 0.0) for _ in range(cfg.n_preferences_eval)]
    w = world(6)
    splits["prompts"] = [{"prompt": w.prompt(w.sentiment())} for _ in range(cfg.n_prompts)]
    seen = {row["prompt"] for name in ("sft", "preferences", "prompts") for row in splits[name]}
    w, held_out = world(7), []
    while len(held_out) < cfg.n_eval_prompts:
        prompt = w.prompt(w.sentiment())
        if prompt not in seen:
            seen.add(prompt)
            held_out.append({"prompt": prompt})
    splits["eval_prompts"] = held_out
    return splits


def write_splits(cfg: EmbeddedTaskConfig, directory: str | Path) -> dict[str, Path]:
    """Write every split as ``<name>.jsonl`` in ``directory``; returns name -> path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in generate_splits(cfg).items():
        path = directory / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        tmp.replace(path)
        paths[name] = path
    return paths
