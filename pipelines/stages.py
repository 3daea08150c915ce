"""The stages a pipeline is made of. Each is a function ``StageContext -> StageResult`` that reads the artifacts of
earlier stages, trains (resuming from its own checkpoints when a previous attempt left some) and writes its
artifacts atomically. They run inside a Ray task, a Ray Train worker group, or this process.

    base  builds (once, cached) or locates the frozen base        -> model_dir, data_dir
    sft   the 'sft' adapter on the base                            -> sft/adapter
    rm    the 'reward' adapter + score head                        -> rm/adapter (+ head)
    dpo   the 'policy' adapter, reference = frozen 'sft'           -> dpo/adapter (+ pairs.jsonl; with rounds:
          (on-policy pairs ranked by a reward function, or by         round-<r>/, dpo_rounds.py)
          the frozen 'reward' adapter + head: pair_reward=model)
    ppo / grpo / rloo  the 'policy' (+ 'value') adapters           -> <stage>/adapter (+ value/)
    eval  samples from the policy and its reference, scored        -> eval/result.json
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from align.config import DataConfig
from align.models.device import device_of

from .context import ROLE_OF_STAGE, StageContext, StageResult, barrier, rank
from .manifest import hash_path

ROUND_SEED_STRIDE = 1000  # round r of iterative DPO samples pairs with seed + 11 + 1000 (r - 1)


def _data(ctx: StageContext, train: str, **extra) -> DataConfig:
    d = ctx.cfg.data
    settings = {"max_length": d.max_length, "max_prompt_length": d.max_prompt_length, "on_bad_rows": d.on_bad_rows,
                "cache_dir": d.cache_dir, **extra}
    return DataConfig(train=train, **settings)


def _inputs(*paths: str) -> dict[str, str]:
    return {p: hash_path(p) for p in paths if p and Path(p).exists()}


def _reward(ctx: StageContext, spec, key: str, path: str, tok, prompt_rows=None):
    """The reward ``spec`` names (not 'model'), with the prompts file's extra columns found for it: by the user's
    prompt words, by the chat-templated prompt decoded, and by the decoded ``prompt_rows`` (a prepared prompts
    dataset: what the RL trainers pass)."""
    from align.data import load_prompts
    from align.models.generate import encode_prompts, prompt_text
    from reward.functions import PromptColumns, build_reward

    prompts, rows, columns = load_prompts(path, _data_key(ctx, path), on_bad_rows=ctx.cfg.data.on_bad_rows,
                                          with_rows=True)
    decoded = tok.batch_decode(encode_prompts(tok, prompts), skip_special_tokens=True)
    prepared: dict[int, str] = {}
    if prompt_rows is not None:
        ids = [list(x) for x in prompt_rows["prompt_ids"]]
        prepared = dict(zip(list(prompt_rows["row"]), tok.batch_decode(ids, skip_special_tokens=True)))
    words = [prompt_text(p) for p in prompts]
    keys = [[w, d] + ([prepared[r]] if r in prepared else []) for w, d, r in zip(words, decoded, rows)]
    return build_reward(spec, key, PromptColumns.build(keys, words, columns, rows, path))


def _data_key(ctx: StageContext, path: str) -> str:
    for key in ("prompts", "eval_prompts"):
        if getattr(ctx.cfg.data, key) == path:
            return f"data.{key}"
    return "data.prompts"


def _prompts(ctx: StageContext, path: str, key: str, limit: int | None = None) -> list:
    """The prompts of ``path`` as written (strings or conversations), validated with ``key`` in the errors."""
    from align.data import load_prompts

    return load_prompts(path, key, limit, on_bad_rows=ctx.cfg.data.on_bad_rows)


# ------------------------------------------------------------------------------------------------ base
def run_base(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    if cfg.embedded:
        from align.models.embedded import build_embedded_base

        info = build_embedded_base(cfg.data.embedded, cfg.model.embedded)
        metrics = {k: v for k, v in info.report.items() if isinstance(v, (int, float))}
        model_dir, data_dir = info.model_dir, info.data_dir
    elif cfg.gguf_path is not None:
        from align.models.convert import convert_gguf, gguf_cache_dir

        model_dir, data_dir = convert_gguf(cfg.gguf_path, gguf_cache_dir(cfg.gguf_path)), None
        metrics = {}
    else:
        model_dir, data_dir = Path(cfg.model.path), None
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"model.path={cfg.model.path}: no config.json there; point it at a local "
                                    "transformers model directory (align never downloads)")
        metrics = {}
    with ctx.tracker() as tracker:
        tracker.log({f"base/{k}": v for k, v in metrics.items()}, step=0)
    fingerprint = json.loads((model_dir / "config.json").read_text())
    return StageResult(metrics=metrics,
                       artifacts={"model_dir": str(Path(model_dir).resolve()),
                                  "data_dir": str(Path(data_dir).resolve()) if data_dir else None},
                       inputs={"model/config.json": hash_path(model_dir / "config.json"),
                               "architecture": str(fingerprint.get("architectures"))})


# ------------------------------------------------------------------------------------------------ sft
def run_sft(ctx: StageContext) -> StageResult:
    from align.data import SFTCollator, prepare_sft, split_heldout
    from align.trainers.sft import build_sft_trainer, heldout_nll

    st = ctx.cfg.trainer["sft"]
    model, tok = ctx.load_model()
    path = ctx.data_path("sft", "sft.jsonl")
    rows = prepare_sft(_data(ctx, path), tok, key="data.sft")
    train, held = split_heldout(rows, ctx.cfg.data.sft_eval_rows)
    model.add_adapter("sft", ctx.adapter_config())
    collate = SFTCollator(tok.pad_token_id)
    before = heldout_nll(model, held, collate, st.method, None)
    with ctx.tracker() as tracker:
        last = build_sft_trainer(model, train, held, tok.pad_token_id, st.method, ctx.loop(), st.optimizer, ctx.dir,
                                 tracker).fit()
    model.eval()
    after = heldout_nll(model, held, collate, st.method, "sft")
    metrics = {"eval/nll_base": before, "eval/nll": after, "train/loss": last.get("train/loss"),
               "train_rows": len(train)}
    return StageResult(metrics, {"adapter": ctx.save_adapter_atomic(model, "sft")}, _inputs(path))


# ------------------------------------------------------------------------------------------------ rm
def run_rm(ctx: StageContext) -> StageResult:
    from align.data import PreferenceCollator, prepare_preferences, split_heldout
    from align.trainers.reward_model import (
        build_reward_trainer,
        fit_statistics,
        new_reward_head,
        pairwise_accuracy,
    )

    st = ctx.cfg.trainer["rm"]
    init_sft = st.extras.init == "sft"
    model, tok = ctx.load_model(("sft",) if init_sft else ())
    path = ctx.data_path("preferences", "preferences.jsonl")
    prefs = prepare_preferences(_data(ctx, path), tok, key="data.preferences")
    train, noisy_held = split_heldout(prefs, ctx.cfg.data.rm_eval_rows)
    clean_path = ctx.cfg.data.preferences_eval or (None if not ctx.cfg.embedded else
                                                    ctx.data_path("preferences_eval", "preferences_eval.jsonl"))
    held = prepare_preferences(_data(ctx, clean_path), tok, key="data.preferences_eval") if clean_path else noisy_held
    if init_sft:
        model.copy_adapter("sft", "reward")
    else:
        model.add_adapter("reward", ctx.adapter_config("rm"))
    head = new_reward_head(model)
    with ctx.tracker() as tracker:
        last = build_reward_trainer(model, head, train, held, tok.pad_token_id, st.method, ctx.loop(), st.optimizer,
                                    ctx.dir, tracker).fit()
    model.eval()
    collate = PreferenceCollator(tok.pad_token_id)
    metrics = {f"eval/{k}": v for k, v in pairwise_accuracy(model, head, held, collate, st.method).items()}
    if clean_path:
        noisy = pairwise_accuracy(model, head, noisy_held, collate, st.method)
        metrics.update({"eval/accuracy_train_split_heldout": noisy["accuracy"]})
    fit_statistics(model, head, train, collate, st.method)
    metrics.update({"reward_mean": float(head.mean), "reward_std": float(head.std),
                    "train/loss": last.get("train/loss"), "train_pairs": len(train)})
    artifact = ctx.save_adapter_atomic(model, "reward", head=head)
    return StageResult(metrics, {"adapter": artifact}, _inputs(path, clean_path))


# ------------------------------------------------------------------------------------------------ dpo
def run_dpo(ctx: StageContext) -> StageResult:
    from align.data import prepare_preferences
    from align.trainers.dpo import build_dpo_trainer

    st = ctx.cfg.trainer["dpo"]
    if st.extras.rounds > 1 and st.extras.pairs == "onpolicy":  # iterative DPO: its layout under dpo/round-<r>/
        from .dpo_rounds import run_dpo_rounds

        return run_dpo_rounds(ctx)
    has_sft = ctx.upstream("sft")
    model, tok = ctx.load_model(dpo_adapters(ctx))
    method = st.method if has_sft else replace(st.method, reference=None)
    metrics: dict = {}
    if st.extras.pairs == "onpolicy":
        pairs_file = ctx.dir / "pairs.jsonl"
        source = ctx.data_path("prompts", "prompts.jsonl")
        seconds = sample_onpolicy_pairs(ctx, model, tok, "sft" if has_sft else None, pairs_file)
        if seconds is not None:
            metrics["pairs_seconds"] = seconds
        train_path = str(pairs_file)
        # sampled text that the tokenizer cannot round-trip is dropped (and counted), never fatal
        train = prepare_preferences(_data(ctx, train_path, on_bad_rows="skip"), tok)
        inputs = _inputs(source)
    else:
        train_path = ctx.data_path("preferences", "preferences.jsonl")
        train = prepare_preferences(_data(ctx, train_path), tok, key="data.preferences")
        inputs = _inputs(train_path)
    eval_path, held = dpo_eval_set(ctx, tok)
    metrics["train_pairs"] = len(train)
    with ctx.tracker() as tracker:
        last = build_dpo_trainer(model, train, held, tok.pad_token_id, method, ctx.loop(), st.optimizer, ctx.dir,
                                 tracker, adapter_config=ctx.adapter_config()).fit()
    metrics.update({k: v for k, v in last.items() if k.startswith("eval/") or k == "train/loss"})
    artifacts = {"adapter": ctx.save_adapter_atomic(model, "policy")}
    if st.extras.pairs == "onpolicy":
        artifacts["pairs"] = ctx.rel(ctx.dir / "pairs.jsonl")
    return StageResult(metrics, artifacts, {**inputs, **_inputs(eval_path)})


def dpo_adapters(ctx: StageContext) -> tuple[str, ...]:
    """The finished stages whose adapters the dpo stage (each of its rounds) loads, frozen: 'sft' (the reference and
    the policy's start) when it runs first, and 'rm' when the reward model ranks the on-policy pairs. The reward
    adapter is loaded whether or not the pairs still need sampling, so a resumed stage holds the same adapters; it
    is only ever active inside ``reward_model_scorer`` and never trains (DPO trains the policy adapter alone)."""
    ex = ctx.cfg.trainer["dpo"].extras
    ranks_by_model = ex.pairs == "onpolicy" and ex.pair_reward == "model"
    return tuple(s for s in ("sft", "rm") if ctx.upstream(s) and (s == "sft" or ranks_by_model))


def round_prompts(prompts: list, per_round: int, number: int) -> list:
    """Round ``number``'s ``per_round`` prompts: the next slice after the previous rounds' (round 1: the first
    ``per_round``), wrapping around the file, so successive rounds see other prompts while the file lasts."""
    take = min(per_round, len(prompts))
    start = (number - 1) * per_round % max(len(prompts), 1)
    return [prompts[(start + i) % len(prompts)] for i in range(take)]


def sample_onpolicy_pairs(ctx: StageContext, model, tok, adapter: str | None, pairs_file: Path,
                          number: int = 1) -> float | None:
    """Write the on-policy pairs of round ``number`` (1 without rounds), sampled from ``adapter`` (None: the bare
    base) with that round's seed and prompts, to ``pairs_file`` unless it exists: sampled once, so a resumed stage
    trains on the same pairs. Rank 0 samples, the other (DeepSpeed) ranks wait. The seconds spent sampling, or None
    when the pairs were already there."""
    from reward.pairs import sample_preference_pairs, write_jsonl

    ex = ctx.cfg.trainer["dpo"].extras
    seconds = None
    if not pairs_file.is_file() and rank() == 0:
        start = time.perf_counter()
        source = ctx.data_path("prompts", "prompts.jsonl")
        prompts = round_prompts(_prompts(ctx, source, "data.prompts"), ex.pair_prompts, number)
        if ex.pair_reward == "model":  # validated: an rm stage runs before dpo, and dpo_adapters loaded it
            reward_fn, score_ids = None, reward_model_scorer(ctx, model, tok.pad_token_id)
        else:
            reward_fn, score_ids = _reward(ctx, ex.pair_reward, "trainer.dpo.pair_reward", source, tok), None
        rows = sample_preference_pairs(model, adapter, tok, prompts, reward_fn, k=ex.pair_samples,
                                       max_new_tokens=ex.pair_max_new_tokens,
                                       seed=ctx.cfg.run.seed + 11 + ROUND_SEED_STRIDE * (number - 1),
                                       score_ids=score_ids)
        if not rows:
            where = f" in round {number}" if ex.rounds > 1 else ""
            raise ValueError(f"trainer.dpo.pair_reward: no preference pair from {len(prompts)} prompts x "
                             f"{ex.pair_samples} samples{where}: on every prompt the samples tied under the reward "
                             "(or were empty); use a reward that separates responses (a weighted sum with a "
                             "length rule breaks ties), more trainer.dpo.pair_samples or pair_prompts, or "
                             "trainer.dpo.pairs=dataset")
        write_jsonl(rows, pairs_file)
        seconds = round(time.perf_counter() - start, 1)
    barrier()  # other DeepSpeed ranks wait for rank 0's pairs
    return seconds


def reward_model_scorer(ctx: StageContext, model, pad_token_id: int):
    """``score_ids`` for ``sample_preference_pairs``: the raw rewards (N,) of the rm stage's frozen reward adapter
    (loaded by ``dpo_adapters``) + score head for sequences ``prompt_ids[i] + response_ids[i]`` (the response through
    its EOS), laid out right-padded as the RL stages lay out and score their rollouts; in eval mode, without
    gradients, ``trainer.rm.eval_batch_size`` sequences at a time. The model's train/eval mode is restored."""
    import torch

    from align.models.heads import ScalarHead
    from align.trainers.reward_model import sequence_rewards
    from align.trainers.rollout import layout

    head = ScalarHead.load(ctx.manifest.artifact("rm", "adapter")).to(device_of(model))
    adapter, batch_size = ROLE_OF_STAGE["rm"], ctx.cfg.trainer["rm"].method.eval_batch_size

    @torch.no_grad()
    def score_ids(prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            scores = []
            for start in range(0, len(prompt_ids), batch_size):
                prompts, responses = prompt_ids[start:start + batch_size], response_ids[start:start + batch_size]
                rows = layout(prompts, responses, pad_token_id, torch.ones(len(prompts), dtype=torch.bool))
                scores.append(sequence_rewards(model, head, rows.batch(), adapter).float().cpu())
            return torch.cat(scores) if scores else torch.zeros(0)
        finally:
            model.train(was_training)

    return score_ids


def dpo_eval_path(ctx: StageContext) -> str | None:
    """The held-out preference pairs DPO evaluates on (the embedded task's own on the embedded base), or None."""
    return ctx.cfg.data.preferences_eval or (ctx.data_path("preferences_eval", "preferences_eval.jsonl")
                                             if ctx.cfg.embedded else None)


def dpo_eval_set(ctx: StageContext, tok) -> tuple[str | None, object]:
    """(path, prepared pairs) of the held-out preference pairs; (None, None) without any."""
    from align.data import prepare_preferences

    eval_path = dpo_eval_path(ctx)
    held = prepare_preferences(_data(ctx, eval_path), tok, key="data.preferences_eval") if eval_path else None
    return eval_path, held


# ------------------------------------------------------------------------------------------------ rl
def run_rl(ctx: StageContext) -> StageResult:
    from align.data import prepare_prompts
    from align.models.heads import ScalarHead
    from align.trainers.grpo import build_grpo_trainer
    from align.trainers.ppo import build_ppo_trainer
    from align.trainers.rloo import build_rloo_trainer

    stage = ctx.stage
    st = ctx.cfg.trainer[stage]
    has_sft = ctx.upstream("sft")
    uses_model = st.extras.reward == "model"
    model, tok = ctx.load_model(tuple(s for s in ("sft", "rm") if ctx.upstream(s) and (s == "sft" or uses_model)))
    method = st.method if has_sft else replace(st.method, reference=None)
    path = ctx.data_path("prompts", "prompts.jsonl")
    prompts = prepare_prompts(_data(ctx, path, lint_samples=0), tok, key="data.prompts")
    reward = ({"reward_head": ScalarHead.load(ctx.manifest.artifact("rm", "adapter")).to(device_of(model))}
              if uses_model
              else {"reward_fn": _reward(ctx, st.extras.reward, f"trainer.{stage}.reward", path, tok, prompts)})
    builder = {"ppo": build_ppo_trainer, "grpo": build_grpo_trainer, "rloo": build_rloo_trainer}[stage]
    with ctx.tracker() as tracker:
        trainer = builder(model, prompts, tok, method, ctx.loop(), st.optimizer, ctx.dir, tracker=tracker,
                          adapter_config=ctx.adapter_config(), **reward)
        last = trainer.fit()
    artifacts = {"adapter": ctx.save_adapter_atomic(model, "policy")}
    if method.uses_value:
        artifacts["value"] = ctx.save_adapter_atomic(model, method.value, head=trainer.value_head, subdir="value")
    keys = ("reward/score_mean", "kl", "kl_coef", "entropy", "response_length")
    return StageResult({k: last[k] for k in keys if k in last}, artifacts, _inputs(path))


# ------------------------------------------------------------------------------------------------ eval
def policy_stage(stages: tuple[str, ...]) -> str:
    for name in ("dpo", "ppo", "grpo", "rloo", "sft"):
        if name in stages:
            return name
    raise ValueError(f"pipeline.stages={list(stages)}: 'eval' needs a stage that trains a policy")


def run_eval(ctx: StageContext) -> StageResult:
    import torch

    from align.config.rl import RolloutConfig
    from align.models.generate import encode_prompts, prompt_text
    from align.trainers.reward_model import sequence_rewards
    from align.trainers.rollout import generate_rollout

    cfg, ev = ctx.cfg, ctx.cfg.eval
    stages = cfg.pipeline.stages
    policy = policy_stage(stages[: stages.index("eval")])
    reference = "sft" if policy != "sft" and "sft" in stages else None
    reward_name = cfg.eval_reward  # validated: 'model' only with an rm stage; 'none': no scored samples
    loaded = [s for s in ("sft", "rm") if s in stages and (s == "sft" or reward_name == "model")]
    model, tok = ctx.load_model(tuple(loaded))
    if policy != "sft":
        model.load_adapter(ctx.manifest.artifact(policy, "adapter"), "eval_policy")
    policy_adapter = "eval_policy" if policy != "sft" else "sft"
    path = ctx.data_path("eval_prompts", "eval_prompts.jsonl")
    prompts = _prompts(ctx, path, "data.eval_prompts", ev.prompts)
    prompt_ids = encode_prompts(tok, prompts)
    rollout_cfg = RolloutConfig(max_new_tokens=ev.max_new_tokens, temperature=ev.temperature,
                                generation_batch_size=64)
    head = reward_fn = None
    if reward_name not in ("model", "none"):
        reward_fn = _reward(ctx, reward_name, "eval.reward", path, tok)
    if reward_name == "model":
        from align.models.heads import ScalarHead

        head = ScalarHead.load(ctx.manifest.artifact("rm", "adapter")).to(device_of(model))
    model.eval()
    results = {}
    with torch.no_grad():
        for name, adapter in (("policy", policy_adapter), ("reference", reference)):
            torch.manual_seed(ev.seed)
            rollout = generate_rollout(model, adapter, prompt_ids, rollout_cfg, tok.eos_token_id, tok.pad_token_id)
            rollout.decode(tok)
            batch = rollout.batch()
            scores = None
            if head is not None:
                scores = torch.cat([sequence_rewards(model, head, rollout.batch(slice(i, i + 64)), "reward")
                                    for i in range(0, len(rollout), 64)]).float()
            elif reward_fn is not None:
                scores = reward_fn(rollout.prompts, rollout.responses)
            results[name] = {"scores": scores, "responses": rollout.responses,
                             "kl": response_kl(model, batch, adapter, reference).mean().item(),
                             "length": rollout.response_lengths.float().mean().item()}
        pairs = _heldout_pairs(ctx, model, tok, policy_adapter, reference)
    p, r = results["policy"], results["reference"]
    result = {"policy": policy, "reference": reference or "base", "reward": reward_fn.name if reward_fn is not None else reward_name, "prompts": len(prompts),
              "kl_to_reference": p["kl"], "policy_length": p["length"], "reference_length": r["length"],
              **_score_summary(p["scores"], r["scores"]), **pairs}
    result["examples"] = [{"prompt": prompt_text(prompts[i]), "policy": p["responses"][i],
                           "reference": r["responses"][i]} for i in range(min(5, len(prompts)))]
    if p["scores"] is not None:
        for i, example in enumerate(result["examples"]):
            example.update(policy_score=p["scores"][i].item(), reference_score=r["scores"][i].item())
    from .manifest import write_json_atomic

    write_json_atomic(ctx.dir / "result.json", result)
    keys = ("win_rate", "wins", "ties", "losses", "policy_score_mean", "reference_score_mean", "kl_to_reference",
            "pairs_accuracy", "pairs_margin")
    metrics = {k: result[k] for k in keys if k in result}
    with ctx.tracker() as tracker:
        tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step=0)
    return StageResult(metrics, {"result": ctx.rel(ctx.dir / "result.json")}, _inputs(path, pairs.get("pairs_file")))


def response_kl(model, batch: dict, adapter: str | None, reference: str | None):
    """Per response (N,): sum over its tokens of log pi_adapter - log pi_reference, the k1 estimate of
    KL(adapter || reference) in nats per response when the responses were sampled from ``adapter``."""
    from align.models.forward import response_token_logps

    with model.use(adapter):
        logps, mask = response_token_logps(model, batch)
    with model.use(reference):
        ref_logps, _ = response_token_logps(model, batch)
    return ((logps - ref_logps) * mask).sum(1)


def sampled_kl(model, tok, adapter: str | None, reference: str | None, prompts: list, max_new_tokens: int,
               seed: int) -> float:
    """KL(adapter || reference) in nats per response, estimated as the eval stage does: one sample per prompt from
    ``adapter`` (temperature 1, seeded), the mean of ``response_kl`` over them."""
    import torch

    from align.config.rl import RolloutConfig
    from align.models.generate import encode_prompts
    from align.trainers.rollout import generate_rollout

    cfg = RolloutConfig(max_new_tokens=max_new_tokens, temperature=1.0, generation_batch_size=64)
    was_training = model.training
    model.eval()  # no adapter dropout in the log-probs
    try:
        with torch.no_grad():
            rollout = generate_rollout(model, adapter, encode_prompts(tok, prompts), cfg, tok.eos_token_id,
                                       tok.pad_token_id, seed=seed)
            return response_kl(model, rollout.batch(), adapter, reference).mean().item()
    finally:
        model.train(was_training)


def _score_summary(policy, reference) -> dict:
    """Means, spreads and the paired win-rate of two score tensors (N,); empty when nothing scored them."""
    if policy is None:
        return {}
    from reward.evaluate import compare

    comparison = compare(policy, reference)
    return {"policy_score_mean": comparison.mean_a, "reference_score_mean": comparison.mean_b,
            "policy_score_std": policy.std().item(), "reference_score_std": reference.std().item(),
            "win_rate": comparison.win_rate, "wins": int((policy > reference).sum()),
            "ties": int((policy == reference).sum()), "losses": int((policy < reference).sum())}


def _heldout_pairs(ctx: StageContext, model, tok, policy: str, reference: str | None) -> dict:
    """The policy on held-out preference pairs (``data.preferences_eval``, the embedded task's own on the embedded
    base): the share of pairs whose implicit reward beta * log(pi / pi_ref) ranks chosen above rejected, the mean
    margin (beta = trainer.dpo.beta), and how often the policy and the reference give the chosen response the
    higher log-probability. No reward model needed. Empty without held-out pairs."""
    from align.data import PreferenceCollator, prepare_preferences
    from align.trainers.dpo import evaluate_pairs

    path = ctx.cfg.data.preferences_eval or (ctx.data_path("preferences_eval", "preferences_eval.jsonl")
                                             if ctx.cfg.embedded else None)
    if not path or ctx.cfg.eval.pairs == 0:
        return {}
    held = prepare_preferences(_data(ctx, path), tok, key="data.preferences_eval")
    held = held.select(range(min(len(held), ctx.cfg.eval.pairs)))
    method = replace(ctx.cfg.trainer["dpo"].method, policy=policy, reference=reference, loss="sigmoid",
                     rpo_alpha=0.0)
    found = evaluate_pairs(model, held, PreferenceCollator(tok.pad_token_id), method)
    ref_found = evaluate_pairs(model, held, PreferenceCollator(tok.pad_token_id),
                               replace(method, policy=reference))
    return {"pairs": len(held), "pairs_file": path, "pairs_accuracy": found["eval/rewards/accuracy"],
            "pairs_margin": found["eval/rewards/margin"], "pairs_chosen_reward": found["eval/rewards/chosen"],
            "pairs_rejected_reward": found["eval/rewards/rejected"],
            "pairs_policy_logp_accuracy": found["eval/logps/accuracy"],
            "pairs_reference_logp_accuracy": ref_found["eval/logps/accuracy"]}


STAGES = {"base": run_base, "sft": run_sft, "rm": run_rm, "dpo": run_dpo, "ppo": run_rl, "grpo": run_rl,
          "rloo": run_rl, "eval": run_eval}


def execute_stage(stage: str, cfg, run_dir: str, num_threads: int | None = None) -> dict:
    """Run one stage (in whatever process this is) and return its result as a plain dict."""
    import os

    import torch

    from .manifest import Manifest

    if num_threads:
        torch.set_num_threads(num_threads)
    run_path = Path(run_dir)
    for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", ".wandb-cache"), ("WANDB_CONFIG_DIR", ".wandb-config"),
                     ("WANDB_DATA_DIR", ".wandb-data")):
        os.environ[var] = str(run_path / sub) if sub else str(run_path)  # W&B's files stay in the run dir
    torch.manual_seed(cfg.run.seed)
    ctx = StageContext(stage, cfg, run_path, Manifest.load(run_path))
    ctx.dir.mkdir(parents=True, exist_ok=True)
    result = STAGES[stage](ctx)
    return {**asdict(result), "device": ctx.device}
