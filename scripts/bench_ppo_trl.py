"""PPO step time and peak memory: align's PPO trainer (four roles as adapters on ONE frozen base) vs TRL 1.12's
``PPOTrainer`` (a PEFT LoRA policy whose reference is the same model with the adapter disabled, plus a separate
reward model and a separate value model) vs align's naive four-copy setup (the same algorithm with one base copy
per role, the layout of OpenRLHF / DeepSpeed-Chat).

TRL 1.16 (align's dev peer) has no PPO trainer; its last one shipped in TRL 1.12.0 as
``trl.experimental.ppo.PPOTrainer``. It runs from ``.venv-trl112`` (``bash scripts/install_trl112.sh``): an
environment holding only trl 1.12.0, over the main venv's packages, so both sides run the same torch,
transformers and peft builds. Checked on 2026-11-26: trl 1.12.0 installs from PyPI and its PPOTrainer runs with
torch 2.13.0, transformers 5.23.0, peft 0.21.2 and accelerate 1.15.0, printing only deprecation warnings
(transformers' ``gradient_checkpointing`` rename, and ``generation_config`` passed together with generation
arguments). TRL's loop calls ``gc.collect()`` twice per iteration; that time is part of TRL's iteration time and
is also reported on its own. Each side of each repeat is a fresh process (``bench_common.isolated``) that builds
its models, runs one warm-up PPO iteration and then ``--iterations`` timed ones; it reports the median seconds per
iteration and the process's peak RSS (VmHWM: building included). Sides alternate (A B C, B C A, ...), and the
table gives each side's median over repeats and the ratio ours / TRL.

The same on every side: the benchmark model (``bench_common.MODELS``, random weights, fp32), the prompts (``--prompts``
rows of ``--prompt-len`` random tokens, identical ids), sampling at temperature 1 with top-k/top-p off for exactly
``--new-tokens`` tokens (no EOS stopping on either side), LoRA r=16, alpha 32 on every linear layer of the policy,
one PPO epoch in minibatches of ``--minibatch``, one optimizer step per minibatch, AdamW at lr 1e-5, vf_coef 0.1,
clip 0.2, GAE gamma 1, lambda 0.95, k1 KL penalty 0.05 per token, advantages whitened.

Differences that remain (each side is run as its library runs it; see ``INEQUALITIES``) are printed with the table.

    python scripts/bench_ppo_trl.py [--model 5m|25m] [--repeats 3] [--iterations 3] [--trl-value full|lora]
                                    [--write]

Without ``.venv-trl112`` (or when TRL's side fails) the script stops with the reason; ``--no-trl`` then runs the
fallback the benchmarks issue allows: align's one-base trainer against the four-copy setup of the same algorithm,
and the table says that TRL was not run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    MODELS,
    REPO,
    child_main,
    isolated,
    machine_info,
    machine_line,
    table,
    write_section,
)

MODULE = "scripts.bench_ppo_trl"
TRL_PYTHON = REPO / ".venv-trl112" / "bin" / "python"
LORA_R, LORA_ALPHA, LR, KL_COEF, VF_COEF = 16, 32, 1e-5, 0.05, 0.1
PAD, BOS = 0, 1

INEQUALITIES = [
    "Old log-probs: TRL takes the policy's log-probs of the rollout from the logits `generate` returned "
    "(`output_scores=True`, no extra forward); align runs one more policy forward over the rollout (response "
    "positions only), which also gives the entropy it logs.",
    "Scoring batch: TRL scores the rollout in chunks of `local_rollout_forward_batch_size` (= all prompts here, "
    "one generate call and one forward per role); align scores in chunks of the minibatch size.",
    "Value model: by default TRL trains its separate value model fully (all weights, AdamW state for all of them), "
    "as its PPO example does; `--trl-value lora` gives TRL's value model a LoRA adapter and a trainable score head "
    "instead. align's value role is a LoRA adapter + a head on the shared base (as the naive side's).",
    "Reward model: TRL's is a separate `LlamaForSequenceClassification` (no LM head); align's is a LoRA adapter + "
    "score head on the shared base; the naive side's a LoRA adapter + head on its own copy.",
    "Optimizer: align clips gradients to norm 1 with a cosine schedule; TRL does not clip (linear schedule). Both "
    "AdamW, lr 1e-5, weight decay 0.",
    "Per-iteration extras: TRL gathers and logs its metrics through the HF callback machinery and runs `gc.collect()` "
    "each iteration; align computes its metrics dict (no logging, no checkpoint: `RLTrainer.iteration()`).",
    "A sampled token equal to the pad id (1 in 32,000 per token) is taken as padding by TRL (its masks shorten); "
    "no compute changes.",
]
NAIVE_INEQUALITIES = [
    "Four copies vs align: the four-copy side is a plain loop over align's pieces (the same rollout, chunked scoring "
    "forwards, GAE and losses, AdamW with clipping at norm 1, no schedule) without the trainer's bookkeeping (no "
    "rollout metrics, no prompt stream); its reference is a bare copy of the base, the other three copies carry a "
    "LoRA adapter each.",
]


# ---------------------------------------------------------------------------------------------- shared bits
def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prompt_ids(model: str, prompts: int, prompt_len: int) -> list[list[int]]:
    """``prompts`` rows: BOS then ``prompt_len - 1`` random ids in [3, vocab); the same on every side."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    vocab = MODELS[model].vocab
    return [[BOS, *torch.randint(3, vocab, (prompt_len - 1,), generator=gen).tolist()] for _ in range(prompts)]


def _summary(side: str, times: list[float], warmup: float, built: float, rss_import: float, rss_built: float,
             response_len: float, extra: dict | None = None) -> dict:
    return {"side": side, "iteration_s": [round(t, 4) for t in times], "median_s": statistics.median(times),
            "warmup_s": round(warmup, 3), "build_s": round(built, 3), "rss_import_mib": round(rss_import, 1),
            "rss_built_mib": round(rss_built, 1), "response_len": response_len, **(extra or {})}


# ------------------------------------------------------------------------------------------- ours: one base
def ours_side(model: str, iterations: int, prompts: int, prompt_len: int, new_tokens: int, minibatch: int,
              tmp: str) -> dict:
    """align's PPO trainer: policy (fresh LoRA), reference = the bare base, reward = LoRA + score head, value =
    LoRA + head copied from the reward's, all on one frozen base; ``RLTrainer.iteration()`` is one PPO iteration."""
    import torch

    from align.adapters import AdapterModel, LoraConfig
    from align.config.rl import KLConfig, RLConfig, RolloutConfig
    from align.config.trainer import LoopConfig, OptimizerConfig
    from align.models.heads import ScalarHead
    from align.trainers.ppo import build_ppo_trainer

    rss_import = _rss_mib()
    spec = MODELS[model]

    class Tok:  # EOS outside the vocabulary: never sampled, so every response has exactly new_tokens tokens
        pad_token_id, eos_token_id = PAD, spec.vocab

    torch.manual_seed(0)
    start = time.perf_counter()
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA)
    adapted = AdapterModel(spec.build(seed=0))
    adapted.add_adapter("reward", lora, trainable=False)
    head = ScalarHead(spec.hidden, "score")
    cfg = RLConfig(reference=None, rollout=RolloutConfig(prompts_per_step=prompts, max_new_tokens=new_tokens,
                                                        generation_batch_size=prompts),
                   ppo_epochs=1, minibatch_size=minibatch, kl=KLConfig(coef=KL_COEF), vf_coef=VF_COEF,
                   standardize_reward_model=False)
    rows = [{"prompt_ids": ids} for ids in prompt_ids(model, prompts, prompt_len)]
    trainer = build_ppo_trainer(adapted, rows, Tok(), cfg, LoopConfig(max_steps=1 + iterations, progress=False),
                                OptimizerConfig(lr=LR), tmp, reward_head=head, adapter_config=lora)
    trainer.model.eval()  # as RLTrainer.fit does
    built, rss_built = time.perf_counter() - start, _rss_mib()
    times, lengths = [], []
    for _ in range(1 + iterations):
        t0 = time.perf_counter()
        metrics = trainer.iteration()
        times.append(time.perf_counter() - t0)
        lengths.append(metrics["rollout/response_length"])
    return _summary("ours", times[1:], times[0], built, rss_import, rss_built, statistics.mean(lengths),
                    {"trainable_params": sum(p.numel() for p in trainer.params.values())})


# ------------------------------------------------------------------------------- naive: four copies of the base
def naive_side(model: str, iterations: int, prompts: int, prompt_len: int, new_tokens: int, minibatch: int,
               tmp: str) -> dict:
    """The same PPO iteration with four copies of the base, one per role (policy LoRA, bare reference, reward
    LoRA + head, value LoRA + head), written with align's pieces (rollout, scoring forwards, GAE, PPO losses)."""
    import torch

    from align.adapters import AdapterModel, LoraConfig
    from align.algos import RunningMoments, ppo_policy_loss, ppo_value_loss
    from align.config.rl import KLConfig, RLConfig, RolloutConfig
    from align.models.forward import response_logps_and_entropy, response_token_logps
    from align.models.heads import ScalarHead
    from align.models.roles import POLICY, REFERENCE, REWARD, VALUE, Role
    from align.trainers.ppo import ppo_advantages
    from align.trainers.rl_common import (
        Experience,
        _in_chunks,
        reward_model_scores,
        sequence_values,
        shape_rewards,
    )
    from align.trainers.rollout import generate_rollout

    rss_import = _rss_mib()
    spec = MODELS[model]
    eos = spec.vocab  # never sampled: exactly new_tokens tokens per response
    torch.manual_seed(0)
    start = time.perf_counter()
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA)

    def copy(adapter: str | None, trainable: bool) -> AdapterModel:
        m = AdapterModel(spec.build(seed=0))
        if adapter is not None:
            m.add_adapter(adapter, lora, trainable=trainable)
        return m.eval()

    models = {POLICY: copy("policy", True), REFERENCE: copy(None, False), REWARD: copy("reward", False),
              VALUE: copy("value", True)}
    roles = {REWARD: Role(REWARD, "reward", "score", False), VALUE: Role(VALUE, "value", "value", True)}
    reward_head, value_head = ScalarHead(spec.hidden, "score"), ScalarHead(spec.hidden, "value")
    value_head.load_state_dict(reward_head.state_dict())
    cfg = RLConfig(reference=None, rollout=RolloutConfig(prompts_per_step=prompts, max_new_tokens=new_tokens,
                                                        generation_batch_size=prompts),
                   ppo_epochs=1, minibatch_size=minibatch, kl=KLConfig(coef=KL_COEF), vf_coef=VF_COEF,
                   standardize_reward_model=False)
    params = [*models[POLICY].adapter_parameters("policy"), *models[VALUE].adapter_parameters("value"),
              *value_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    ids = prompt_ids(model, prompts, prompt_len)
    moments, size = RunningMoments(), minibatch

    def iteration() -> float:
        rollout = generate_rollout(models[POLICY], "policy", ids, cfg.rollout, eos, PAD)
        with torch.no_grad():
            def policy(b):
                with models[POLICY].use("policy"):
                    return response_logps_and_entropy(models[POLICY], b, cfg.chunk_size)[:2]

            def reference(b):
                with models[REFERENCE].use(None):
                    return response_token_logps(models[REFERENCE], b, cfg.chunk_size)[:1]

            old, entropy = _in_chunks(policy, rollout, size)
            (ref,) = _in_chunks(reference, rollout, size)
            (values,) = _in_chunks(lambda b: (sequence_values(models[VALUE], roles[VALUE], value_head, b),),
                                   rollout, size)
            (scores,) = _in_chunks(lambda b: (reward_model_scores(models[REWARD], roles[REWARD], reward_head, b,
                                                                  False),), rollout, size)
        exp = Experience(rollout, rollout.response_mask[:, 1:], old, ref, entropy, values, scores)
        shape_rewards(exp, cfg, moments)
        ppo_advantages(exp, KL_COEF, cfg)
        for rows in torch.randperm(len(exp)).split(size):
            mb = rollout.batch(rows)
            width = mb["input_ids"].shape[1] - 1
            with models[POLICY].use("policy"):
                logps, m = response_token_logps(models[POLICY], mb, cfg.chunk_size)
            loss, _ = ppo_policy_loss(logps, old[rows, :width], exp.advantages[rows, :width], m, cfg.clip_eps)
            new_values = sequence_values(models[VALUE], roles[VALUE], value_head, mb)
            vf, _ = ppo_value_loss(new_values, values[rows, :width], exp.returns[rows, :width], m,
                                   cfg.value_clip_eps)
            (loss + cfg.vf_coef * vf).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return rollout.response_lengths.float().mean().item()

    built, rss_built = time.perf_counter() - start, _rss_mib()
    times, lengths = [], []
    for _ in range(1 + iterations):
        t0 = time.perf_counter()
        lengths.append(iteration())
        times.append(time.perf_counter() - t0)
    return _summary("naive", times[1:], times[0], built, rss_import, rss_built, statistics.mean(lengths),
                    {"trainable_params": sum(p.numel() for p in params)})


# ------------------------------------------------------------------------------------------- TRL 1.12 PPO
def trl_side(model: str, iterations: int, prompts: int, prompt_len: int, new_tokens: int, minibatch: int,
             tmp: str, value: str = "full") -> dict:
    """TRL 1.12's PPOTrainer (run with .venv-trl112's interpreter): the policy gets a PEFT LoRA adapter
    (``peft_config``; reference = the adapter disabled), reward and value are separate
    ``LlamaForSequenceClassification`` models of the same size. ``value='full'`` trains the whole value model
    (TRL's recipe), ``'lora'`` a LoRA adapter + the score head. Iteration times come from a callback at the end of
    each PPO iteration (``on_step_end``)."""
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig, inject_adapter_in_model
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    rss_import = _rss_mib()
    # TRL's loop calls gc.collect() twice per iteration; time those calls (they stay in TRL's iteration time)
    gc_seconds = [0.0]

    class TimedGC:
        def collect(self, *a):
            t0 = time.perf_counter()
            try:
                return gc.collect(*a)
            finally:
                gc_seconds[0] += time.perf_counter() - t0

        def __getattr__(self, name):
            return getattr(gc, name)

    trl_ppo.gc = TimedGC()
    spec = MODELS[model]
    torch.manual_seed(0)
    start = time.perf_counter()
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": 2, "<unk>": 3}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    policy = spec.build(seed=0)

    def classifier(seed: int):
        config = spec.config()
        config.num_labels, config.pad_token_id = 1, PAD
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(config)

    reward_model = classifier(1).eval().requires_grad_(False)
    value_model = classifier(2)
    if value == "lora":
        value_model.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear"),
                                value_model.model)  # the backbone only: the score head stays a plain Linear
        value_model.score.requires_grad_(True)
    data = Dataset.from_dict({"input_ids": prompt_ids(model, prompts, prompt_len)})
    args = PPOConfig(
        output_dir=tmp, per_device_train_batch_size=prompts, gradient_accumulation_steps=1,
        num_mini_batches=prompts // minibatch, num_ppo_epochs=1, total_episodes=prompts * (1 + iterations),
        local_rollout_forward_batch_size=prompts, response_length=new_tokens, stop_token=None,
        missing_eos_penalty=None, temperature=1.0, learning_rate=LR, weight_decay=0.0, kl_coef=KL_COEF,
        kl_estimator="k1", vf_coef=VF_COEF, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95,
        whiten_rewards=False, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        report_to="none", save_strategy="no", num_sample_generations=0, disable_tqdm=True, logging_steps=1,
        seed=0, dataloader_num_workers=0)
    peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []
            self.gc_marks: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())
            self.gc_marks.append(gc_seconds[0])

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())
            self.gc_marks.append(gc_seconds[0])

    clock = Clock()
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None,
                         reward_model=reward_model, train_dataset=data, value_model=value_model,
                         eval_dataset=data, peft_config=peft_config, callbacks=[clock])
    built, rss_built = time.perf_counter() - start, _rss_mib()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    with contextlib.redirect_stdout(sys.stderr):  # TRL prints its logs; stdout carries the JSON result only
        trainer.train()
    times = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    gc_times = [b - a for a, b in zip(clock.gc_marks, clock.gc_marks[1:])]
    if len(times) != 1 + iterations:
        raise RuntimeError(f"expected {1 + iterations} PPO iterations, timed {len(times)}")
    lengths = [h["val/num_eos_tokens"] for h in trainer.state.log_history if "val/num_eos_tokens" in h]
    return _summary("trl", times[1:], times[0], built, rss_import, rss_built, float(new_tokens),
                    {"trl": trl.__version__, "transformers": transformers.__version__, "trl_file": trl.__file__,
                     "trainable_params": trainable, "eos_tokens": sum(lengths), "trl_value": value,
                     "gc_s": statistics.median(gc_times[1:]), "gc_objects": len(gc.get_objects())})


def info_side() -> dict:
    """The versions an environment runs (for the TRL environment's line)."""
    info = machine_info()
    import trl

    info["trl_file"] = trl.__file__
    return info


# -------------------------------------------------------------------------------------------------- main
SIDE_TEXT = {
    "ours": "align `build_ppo_trainer`: one frozen base; policy, reward, value as LoRA adapters (+ heads), "
            "reference = the bare base",
    "trl": "TRL {trl} `PPOTrainer`: PEFT LoRA policy (reference = adapter disabled), separate reward and value "
           "models ({value} value model)",
    "naive": "the same PPO iteration as align's, with four copies of the base (one per role)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="5m")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per side (alternating)")
    parser.add_argument("--iterations", type=int, default=3, help="timed PPO iterations per process (+1 warm-up)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--minibatch", type=int, default=4)
    parser.add_argument("--trl-value", choices=("full", "lora"), default="full",
                        help="TRL's value model: trained fully (TRL's recipe) or LoRA + score head")
    parser.add_argument("--trl-python", default=str(TRL_PYTHON), help="the interpreter of the TRL 1.12 environment")
    parser.add_argument("--no-trl", action="store_true",
                        help="fallback: only align vs the four-copy setup (when TRL 1.12 cannot run here)")
    parser.add_argument("--no-naive", action="store_true", help="skip the four-copy side")
    parser.add_argument("--tmp", default="/tmp/bench-ppo-trl")
    parser.add_argument("--write", action="store_true", help="write the section 'ppo' of docs/benchmarks.md")
    args = parser.parse_args()
    if args.iterations < 1 or args.repeats < 1:
        parser.error("--iterations and --repeats must be at least 1")
    if args.prompts % args.minibatch:
        parser.error("--prompts must be a multiple of --minibatch (TRL splits the rollout into equal minibatches)")

    kwargs = {"model": args.model, "iterations": args.iterations, "prompts": args.prompts,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "minibatch": args.minibatch}
    trl_info = None
    if not args.no_trl:
        if not Path(args.trl_python).exists():
            sys.exit(f"no TRL 1.12 environment at {args.trl_python}: run `bash scripts/install_trl112.sh`, or pass "
                     "--no-trl for the fallback comparison (align vs four copies), which says TRL was not run")
        trl_info = isolated(MODULE, "info_side", {}, python=args.trl_python)
        if trl_info.get("trl") != "1.12.0":
            sys.exit(f"{args.trl_python} runs trl {trl_info.get('trl')}, not 1.12.0 ({trl_info.get('trl_file')})")

    sides = {"ours": lambda i: isolated(MODULE, "ours_side", {**kwargs, "tmp": f"{args.tmp}/ours-{i}"})}
    if not args.no_trl:
        sides["trl"] = lambda i: isolated(MODULE, "trl_side", {**kwargs, "tmp": f"{args.tmp}/trl-{i}",
                                                               "value": args.trl_value}, python=args.trl_python)
    if not args.no_naive:
        sides["naive"] = lambda i: isolated(MODULE, "naive_side", {**kwargs, "tmp": f"{args.tmp}/naive-{i}"})
    names = list(sides)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for i in range(args.repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:  # A B C, B C A, C A B, ...
            r = sides[name](i)
            results[name].append(r)
            print(f"repeat {i + 1}/{args.repeats} {name:5s}: {r['median_s']:.3f} s/iteration "
                  f"(warm-up {r['warmup_s']:.2f} s), peak RSS {r['peak_rss_mib']:,.0f} MiB "
                  f"(after imports {r['rss_import_mib']:,.0f}), response length {r['response_len']:.1f}"
                  + (f", gc.collect {r['gc_s']:.3f} s/iteration" if "gc_s" in r else ""), flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    ref = "trl" if "trl" in names else "naive"
    rows = []
    for name in names:
        peak, imported = med(name, "peak_rss_mib"), med(name, "rss_import_mib")
        text = SIDE_TEXT[name].format(trl=trl_info["trl"] if trl_info else "", value=args.trl_value)
        rows.append([text, med(name, "median_s"), med(name, "median_s") / med(ref, "median_s"), peak,
                     peak / med(ref, "peak_rss_mib"), imported, peak - imported,
                     (peak - imported) / (med(ref, "peak_rss_mib") - med(ref, "rss_import_mib"))])
    header = ["side", "s/iteration", f"time / {ref}", "peak RSS (MiB)", f"RSS / {ref}", "RSS after imports",
              "peak over imports", f"over imports / {ref}"]
    spec = MODELS[args.model]
    info = machine_info()
    command = "python scripts/bench_ppo_trl.py " + " ".join(sys.argv[1:])
    weights = ("the real pretrained weights (TRL's reward and value models: fresh score heads on random-weight "
               "copies)" if spec.name == "smollm2" else "random weights")
    setup = (f"Model `{spec.name}` (Llama, hidden {spec.hidden}, {spec.layers} layers, vocab {spec.vocab:,}, "
             f"{spec.parameters / 1e6:.1f}M parameters, {weights}, fp32); {args.prompts} prompts x "
             f"{args.prompt_len} tokens, exactly {args.new_tokens} new tokens (no EOS stop), 1 PPO epoch, minibatch "
             f"{args.minibatch}, LoRA r={LORA_R} alpha={LORA_ALPHA} on all linear layers; per process 1 warm-up + "
             f"{args.iterations} timed iterations, {args.repeats} fresh processes per side, alternating; medians.")
    lines = [f"## PPO, model {spec.name}: align vs TRL's PPOTrainer vs four model copies (`scripts/bench_ppo_trl.py`)", "",
             f"`{command}` on {info['date']}.", "", f"Machine (align side): {machine_line(info)}."]
    if trl_info:
        lines += ["", f"TRL side: trl {trl_info['trl']} (`trl.experimental.ppo.PPOTrainer`, the last TRL release with "
                  f"PPO) in `.venv-trl112` (`scripts/install_trl112.sh`: trl 1.12.0 alone, over the main venv's "
                  f"packages), running torch {trl_info['torch']}, transformers {trl_info['transformers']}, peft "
                  f"{trl_info['peft']}."]
    else:
        lines += ["", "**TRL was not run** (`--no-trl`): the comparison is the fallback the benchmarks issue allows, "
                  "align's one-base trainer against a four-separate-models PPO built from the same algorithm."]
    lines += ["", setup, "", table(header, rows), ""]
    if "trl" in names:
        rss_ok, time_ok = rows[0][4] <= 0.4, rows[0][2] <= 1.0
        lines += [f"Targets (benchmarks issue): peak RSS <= 0.4x TRL: measured {rows[0][4]:.3f}x "
                  f"({'met' if rss_ok else 'not met'}; over the interpreter's own imports {rows[0][7]:.3f}x); step "
                  f"time <= 1.0x TRL: measured {rows[0][2]:.3f}x ({'met' if time_ok else 'not met'}).",
                  "",
                  f"Of TRL's {med('trl', 'median_s'):.3f} s/iteration, {med('trl', 'gc_s'):.3f} s is spent in the two "
                  f"`gc.collect()` calls its PPO loop makes every iteration (about "
                  f"{med('trl', 'gc_objects'):,.0f} live Python objects in its process; that cost does not grow "
                  f"with the model); against TRL's time without them align's ratio would be "
                  f"{med('ours', 'median_s') / (med('trl', 'median_s') - med('trl', 'gc_s')):.2f}x.", ""]
    if "naive" in names and ref != "naive":
        lines += [f"align vs four copies: time {med('ours', 'median_s') / med('naive', 'median_s'):.2f}x, peak RSS "
                  f"{med('ours', 'peak_rss_mib') / med('naive', 'peak_rss_mib'):.2f}x.", ""]
    notes = (INEQUALITIES if "trl" in names else []) + (NAIVE_INEQUALITIES if "naive" in names else [])
    lines += ["Differences that remain between the sides:", ""] + [f"- {x}" for x in notes] + [""]
    lines += ["Per-process medians (s/iteration): " + "; ".join(
        f"{n} " + ", ".join(f"{r['median_s']:.3f}" for r in results[n]) for n in names) + "."]
    markdown = "\n".join(lines)
    print("\n" + markdown)
    if args.write:
        write_section(f"ppo-{spec.name}", markdown)
        print(f"\nwrote section 'ppo-{spec.name}' of docs/benchmarks.md")


if __name__ == "__main__":
    if not child_main(globals()):
        main()
