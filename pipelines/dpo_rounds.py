"""Iterative (online) DPO, ``trainer.dpo.rounds`` > 1 (iterative DPO, Xu et al. 2023; Self-Rewarding LMs, Yuan et
al. 2024): each round samples fresh on-policy pairs from the current policy (round 1: the SFT adapter) and trains
that policy further with a fresh DPO trainer (fresh optimizer and schedule, ``max_steps`` steps) against a frozen
reference: the SFT adapter (``round_reference=sft``) or the policy as the previous round left it (``previous``).

    dpo/round-<r>/pairs.jsonl     the round's pairs, sampled once: a resumed round trains on the same pairs
    dpo/round-<r>/checkpoints/    the round's trainer checkpoints: an interrupted round resumes from them
    dpo/round-<r>/result.json     the round's metrics
    dpo/round-<r>/adapter/        the policy after the round, written last: its presence means the round finished
    dpo/round-<r>/kl.json         with ``kl_budget``: the round's policy's KL to the SFT policy, measured once
    dpo/adapter/                  a copy of the last round's adapter: the stage's artifact, as with one round

``kl_budget``: before round r > 1 the policy of round r-1 is sampled on the first ``KL_PROMPTS`` prompts and its KL
to the SFT policy (nats per response, as the eval stage measures it) is kept in ``round-<r-1>/kl.json``. Round r
runs only if that KL plus the increase of the round before (round 1's increase is its KL) stays within the budget;
otherwise the stage stops and its adapter is round r-1's. (A shortened last round was tried and dropped: a round's
KL is front-loaded, 36 of 75 steps added 0.89 nats where a whole round had added 0.64.) The decision reads the kept
numbers, so a resumed stage makes the same one. The measurement loads its own plain model on rank 0 (the other DeepSpeed ranks wait), before
the next round builds its trainer.

Every round loads the base afresh and reads the previous round's adapter back from disk, whether that round
finished a moment ago or in an earlier attempt, and reseeds the global RNG from the run's seed and its number. A run
interrupted anywhere and rerun therefore ends with the adapter of a run that never stopped, bit for bit; and under
DeepSpeed a round never inherits the previous round's engine and partitioned parameters.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from align.durable import replace_dir_durable

from .context import StageContext, StageResult, barrier, rank
from .manifest import write_json_atomic
from .stages import (
    ROUND_SEED_STRIDE,
    _data,
    _inputs,
    _prompts,
    dpo_adapters,
    dpo_eval_path,
    dpo_eval_set,
    sample_onpolicy_pairs,
    sampled_kl,
)

RESULT = "result.json"
KL_FILE = "kl.json"
KL_PROMPTS = 256  # prompts (one sample each) a round's KL to the SFT policy is measured on
KL_SEED_OFFSET = 17
# a round's numbers that go into the stage's metrics as round-<r>/<key> (result.json keeps them all)
ROUND_METRICS = ("train_pairs", "pairs_seconds", "seconds", "train/loss", "eval/rewards/accuracy",
                 "eval/rewards/margin", "eval/loss", "eval/kl_estimate")


class RoundTracker:
    """The stage's one tracker as a round's trainer sees it: round ``number``'s step s is logged as step
    (number - 1) * steps + s, so ``metrics.jsonl`` and the W&B curves run on across rounds instead of starting
    over (a report keeps the later of two lines with the same step), and each line carries its round."""

    def __init__(self, tracker, number: int, steps: int) -> None:
        self.tracker, self.number, self.offset = tracker, number, (number - 1) * steps

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.tracker.log({**metrics, "round": self.number}, step=self.offset + step)


def round_dir(ctx: StageContext, number: int) -> Path:
    return ctx.dir / f"round-{number}"


def run_dpo_rounds(ctx: StageContext) -> StageResult:
    """Train the rounds a previous attempt did not finish (up to ``rounds``, fewer when ``kl_budget`` stops them),
    then publish the last round's adapter as ``dpo/adapter``. Metrics: each round's under ``round-<r>/``, the
    rounds trained, and the last round's under the keys a one-round stage reports (``train_pairs``, ``eval/*``,
    ``train/loss``)."""
    ex = ctx.cfg.trainer["dpo"].extras
    rounds, budget = ex.rounds, ex.kl_budget
    metrics: dict[str, Any] = {"rounds": rounds}
    artifacts: dict[str, str] = {}
    result: dict[str, Any] = {}
    trained, kls = 0, [0.0]  # kls[r]: KL to SFT after round r (round 0: the SFT policy itself)
    with ctx.tracker() as tracker:
        for number in range(1, rounds + 1):
            if budget is not None and number > 1:
                kls.append(round_kl(ctx, number - 1))
                metrics[f"round-{number - 1}/kl_to_sft"] = kls[-1]
                projected = projected_kl(kls)
                if projected > budget:
                    metrics["kl_projected"] = projected
                    break
            directory = round_dir(ctx, number)
            if not (directory / "adapter").is_dir():  # finished rounds are skipped, never retrained
                _train_round(ctx, number, tracker)
                _release_memory()  # this round's model (and engine) before the next round loads its own
            result = _read_json(directory / RESULT)
            metrics.update({f"round-{number}/{k}": v for k, v in result.items() if k in ROUND_METRICS})
            artifacts[f"round-{number}/pairs"] = ctx.rel(directory / "pairs.jsonl")
            artifacts[f"round-{number}/adapter"] = ctx.rel(directory / "adapter")
            trained = number
    metrics["rounds_trained"] = trained
    if budget is not None:
        metrics["kl_budget"] = budget
    metrics.update({k: v for k, v in result.items()
                    if k in ("train_pairs", "pairs_seconds", "train/loss") or k.startswith("eval/")})
    final = _publish_final(ctx, round_dir(ctx, trained) / "adapter")
    source = ctx.data_path("prompts", "prompts.jsonl")
    return StageResult(metrics, {"adapter": final, **artifacts}, {**_inputs(source), **_inputs(dpo_eval_path(ctx))})


def projected_kl(kls: list[float]) -> float:
    """The KL to SFT expected after one more round: the last measured KL plus the last round's increase (never a
    decrease). ``kls[r]`` is the KL after round r, ``kls[0] = 0`` (the SFT policy itself)."""
    return kls[-1] + max(kls[-1] - kls[-2], 0.0)


def round_kl(ctx: StageContext, number: int) -> float:
    """KL(policy after round ``number`` || SFT policy) in nats per response: one sample on each of the first
    ``KL_PROMPTS`` prompts of ``data.prompts`` (seeded by the run's seed), measured once on rank 0 in a model of its
    own and kept in ``round-<number>/kl.json``."""
    path = round_dir(ctx, number) / KL_FILE
    if not path.is_file() and rank() == 0:
        has_sft = ctx.upstream("sft")
        model, tok = ctx.load_model(("sft",) if has_sft else ())
        policy = ctx.cfg.trainer["dpo"].method.policy
        model.load_adapter(round_dir(ctx, number) / "adapter", policy)
        prompts = _prompts(ctx, ctx.data_path("prompts", "prompts.jsonl"), "data.prompts", KL_PROMPTS)
        max_new = ctx.cfg.trainer["dpo"].extras.pair_max_new_tokens
        kl = sampled_kl(model, tok, policy, "sft" if has_sft else None, prompts, max_new,
                        seed=ctx.cfg.run.seed + KL_SEED_OFFSET)
        write_json_atomic(path, {"kl_to_sft": kl, "prompts": len(prompts), "max_new_tokens": max_new})
        del model
        _release_memory()
    barrier()
    return float(_read_json(path)["kl_to_sft"])


def _train_round(ctx: StageContext, number: int, tracker) -> None:
    """One round: the base with the SFT adapter (and, with ``pair_reward=model``, the frozen reward model), the
    policy where the previous round left it (round 1: a copy of the SFT adapter, as in one-round DPO), the round's
    reference; its pairs sampled from that policy (once); a fresh DPO trainer on them that resumes from the round's
    checkpoints; the round's metrics, then its adapter."""
    import torch

    from align.data import prepare_preferences
    from align.models.roles import REFERENCE
    from align.trainers.dpo import build_dpo_trainer

    start = time.perf_counter()
    st = ctx.cfg.trainer["dpo"]
    has_sft = ctx.upstream("sft")
    directory = round_dir(ctx, number)
    directory.mkdir(parents=True, exist_ok=True)
    model, tok = ctx.load_model(dpo_adapters(ctx))  # + the frozen reward model with pair_reward=model
    method = st.method if has_sft else replace(st.method, reference=None)
    sample_from = "sft" if has_sft else None  # round 1 samples from what the policy starts as
    if number > 1:
        previous = round_dir(ctx, number - 1) / "adapter"
        model.load_adapter(previous, method.policy, trainable=True)
        sample_from = method.policy
        if st.extras.round_reference == "previous":
            model.load_adapter(previous, REFERENCE)  # frozen
            method = replace(method, reference=REFERENCE)
    pairs_file = directory / "pairs.jsonl"
    pairs_seconds = sample_onpolicy_pairs(ctx, model, tok, sample_from, pairs_file, number)
    # sampled text that the tokenizer cannot round-trip is dropped (and counted), never fatal
    train = prepare_preferences(_data(ctx, str(pairs_file), on_bad_rows="skip"), tok)
    _, held = dpo_eval_set(ctx, tok)
    # the RNG a round trains with (adapter dropout) depends on the seed and the round only, not on whether the
    # rounds before it ran in this process; a round resumed from a checkpoint restores the checkpoint's RNG
    torch.manual_seed(ctx.cfg.run.seed + ROUND_SEED_STRIDE * (number - 1))
    trainer = build_dpo_trainer(model, train, held, tok.pad_token_id, method, ctx.loop(), st.optimizer, directory,
                                RoundTracker(tracker, number, st.loop.max_steps),
                                adapter_config=ctx.adapter_config())
    last = trainer.fit()
    result = {"round": number, "sampled_from": _name(number, sample_from),
              "reference": _name(number, method.reference), "train_pairs": len(train),
              **({"pairs_seconds": pairs_seconds} if pairs_seconds is not None else {}),
              **{k: v for k, v in last.items() if k.startswith("eval/") or k == "train/loss"},
              "seconds": round(time.perf_counter() - start, 1)}
    if rank() == 0:
        write_json_atomic(directory / RESULT, result)
    ctx.save_adapter_atomic(model, method.policy, subdir=f"{directory.name}/adapter")  # last: the round is done


def _name(number: int, adapter: str | None) -> str:
    """What a round's adapter role was, in words for result.json: 'sft', 'base' or 'round-<r>'."""
    if adapter is None:
        return "base"
    return adapter if adapter == "sft" else f"round-{number - 1}"


def _publish_final(ctx: StageContext, source: Path) -> str:
    """Copy the last round's adapter to ``dpo/adapter`` through a temporary directory (rank 0; the others wait):
    the same files, so the stage's artifact is exactly the last round's policy."""
    final = ctx.dir / "adapter"
    if rank() == 0:
        tmp = ctx.dir / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        replace_dir_durable(tmp, final)
    barrier()
    return ctx.rel(final)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # a finished round always has one; a lost file only costs its metrics
        return {}


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
