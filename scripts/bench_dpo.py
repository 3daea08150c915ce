"""DPO training speed, memory and model FLOP utilisation: align vs TRL ``DPOTrainer`` + PEFT LoRA.

Both sides train the same random-weight Llama (``bench_common.MODELS``: "5m", "25m", 32k vocabulary) with the same
LoRA (r=16, alpha=32, dropout 0, on q/k/v/o/gate/up/down of every layer, not lm_head) on the same synthetic pairs
(prompt 64 tokens, chosen and rejected 64 tokens each, the last one EOS; no padding anywhere), 8 pairs per step, no
accumulation, fp32, AdamW (torch's, not fused), constant lr 1e-4, gradient clipping at 1.0, sigmoid loss, beta 0.1,
the reference = the base with the adapter off. Reference log-probs either precomputed once before training (align's
default; TRL ``precompute_ref_log_probs=True``) or computed at every step (``precompute_reference=False``; TRL's
default); each mode is compared with the same mode of the other side.

Each measurement is a fresh process (``bench_common.isolated``): build the model, data and trainer (the one-off
reference pass included, timed on its own), run ``--warmup`` steps, then time ``--steps`` steps (from the end of the
last warm-up step to the end of the last timed step: batch fetch and collation, forward, backward, clipping and the
optimizer step). Reported: seconds per step, tokens/s (prompt + chosen + rejected tokens of the step's pairs:
8 x 192 = 1,536), and the peak RSS (VmHWM) of the whole process. Ours and TRL alternate (A B A B ...) ``--repeats``
times; the tables give medians and the ratios ours/TRL of the medians. Targets: tokens/s >= 1.5x TRL, peak RSS
<= 0.8x TRL.

Model FLOP utilisation (MFU): the machine's peak is measured in the same run (a 2048^3 matmul loop in fp32 and in
bf16, in a fresh process, at the start and at the end; the higher fp32 figure is the peak). A step's FLOPs count the
work the method needs, the same for both sides (``step_flops``)::

    F_frozen = 2*N_body*T_seq + 4*L*H*S*T_seq + 2*N_head*T_out      forward of the frozen base
    policy   = 2*F_frozen + 6*N_lora*T_seq                          forward + backward (activation gradients
                                                                   through the base ~ its forward, no base weight
                                                                   gradients) + LoRA forward, backward, weight grads
    DPO step = policy (+ F_frozen when the reference runs at every step);   SFT step = policy

with N_body = L*(4*H^2 + 3*H*I) the decoder's linear weights, N_head = H*V, N_lora the trainable LoRA weights,
T_seq the tokens in the forward (2 x 8 sequences x 128 = 2,048), T_out the positions whose log-prob is used (the
response positions, 2 x 8 x 64 = 1,024), S = 128 (attention scores and values over the whole sequence). MFU =
FLOPs per step / seconds per step / fp32 peak. Target: >= 60% on the 25M model, for align's steps. The SFT step (align's
``build_sft_trainer``) runs the same 16 sequences of 128 tokens, loss on their last 64 tokens; the reward-model step
(``build_reward_trainer``) the same 8 pairs, scored at their last token (no output head: T_out = 0).

What TRL's API forces (the docs section repeats it): TRL 1.16's DPOTrainer always tokenizes text itself (no
pre-tokenized input), so it gets the same pairs as strings over a local WordLevel tokenizer of the 32k vocabulary
("<pad>" "<s>" "</s>" "<unk>", then "t4" .. "t31999") and the child checks that TRL's token ids equal ours exactly;
TRL 1.16 has no ``max_prompt_length`` (``max_length=None``: no truncation); on CPU its fused LM head scores every
position (the prompt's too) and also computes entropy / mean-logit / top-1 metrics, work the FLOP count does not
credit. Without Triton (CPU) that head runs a torch fallback over (positions x whole vocabulary) fp32 tiles, several
at once, which is where most of TRL's time and memory go at a 32k vocabulary. Its defaults (bf16 autocast, gradient
checkpointing, fused AdamW, linear decay, lr 1e-6) are overridden to match the setup above.

    python scripts/bench_dpo.py [--model 5m|25m|all|tiny] [--repeats 3] [--steps 5] [--warmup 2] [--write]

Run time on 2 cores, estimated from single-step runs on a busy machine (the report states the measured time): the
default (``--model 25m``: 3 repeats x 2 modes x 2 sides = 12 DPO processes, 3 SFT and 2 matmul processes) about
6-8 minutes, TRL's processes taking most of it; ``--model all`` about 10-12 minutes; ``--model tiny --repeats 1
--steps 1 --warmup 1 --matmul-size 256`` (a 2-layer, hidden-32 model, to check that everything runs) about a
minute. ``--write`` puts the report into
docs/benchmarks.md (section ``dpo``); ``--json PATH`` also saves every measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, whether run as a file or with -m

from bench_common import (  # noqa: E402
    MODELS,
    BenchModel,
    Comparison,
    alternate,
    child_main,
    isolated,
    machine_info,
    machine_line,
    table,
    write_section,
)

MODULE = "scripts.bench_dpo"
LORA_R, LORA_ALPHA = 16, 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BETA = 0.1
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3; LlamaConfig's defaults are bos 1, eos 2
PAD, EOS = 0, 2
REF_BATCH = 32  # pairs per batch of the one-off reference pass, both sides (align's DPOConfig.eval_batch_size)
# The children run quietly and offline; both sides get the same environment.
CHILD_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
             "WANDB_MODE": "disabled"}
MFU_TARGET, MFU_MODEL = 0.60, "25m"
# a smoke-test model (`--model tiny`, tests/test_bench_smoke.py): the whole script in well under a minute
TINY = BenchModel("tiny", hidden=32, layers=2, heads=4, intermediate=64, vocab=512)
CHOICES = {**MODELS, "tiny": TINY}
MODES = {"precomputed": True, "every step": False}  # reference log-probs: precompute_reference / ..._ref_log_probs


# ------------------------------------------------------------------------------------------------ data
def _spec(model: str) -> BenchModel:
    return CHOICES[model]


def describe(spec: BenchModel) -> str:
    return (f"{spec.name}: hidden {spec.hidden}, {spec.layers} layers, MLP {spec.intermediate}, vocabulary "
            f"{spec.vocab:,}, {spec.parameters / 1e6:.1f}M parameters")


def preference_rows(vocab: int, pairs: int, prompt_len: int, response_len: int, seed: int = 0) -> list[dict]:
    """Random token pairs: ``prompt_ids`` (prompt_len), ``chosen_ids`` and ``rejected_ids`` (response_len, the last
    one EOS, so TRL appends no EOS of its own). Ids avoid the special tokens."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(len(SPECIAL), vocab, (n,), generator=gen).tolist()

    return [{"prompt_ids": ids(prompt_len), "chosen_ids": ids(response_len - 1) + [EOS],
             "rejected_ids": ids(response_len - 1) + [EOS]} for _ in range(pairs)]


def vocabulary(vocab: int) -> list[str]:
    return list(SPECIAL) + [f"t{i}" for i in range(len(SPECIAL), vocab)]


def word_tokenizer(vocab: int):
    """A transformers tokenizer over ``vocabulary(vocab)``: one word per id, split on whitespace, no special tokens
    added when encoding, so "t7 t9" -> [7, 9]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocabulary(vocab))}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def as_text(row: dict, words: list[str]) -> dict:
    """The row as TRL's standard (non-conversational) preference format. TRL tokenizes prompt + chosen as one
    string, so completions start with a space."""
    def text(ids: list[int]) -> str:
        return " ".join(words[i] for i in ids)

    return {"prompt": text(row["prompt_ids"]), "chosen": " " + text(row["chosen_ids"]),
            "rejected": " " + text(row["rejected_ids"])}


def sft_rows(pairs: list[dict]) -> list[dict]:
    """Two SFT sequences per pair (prompt + chosen, prompt + rejected), loss on the response: the sequences of a
    DPO step, so an SFT step of 2 x batch rows runs the same tokens."""
    rows = []
    for pair in pairs:
        for side in ("chosen_ids", "rejected_ids"):
            rows.append({"input_ids": pair["prompt_ids"] + pair[side],
                         "response_mask": [0] * len(pair["prompt_ids"]) + [1] * len(pair[side])})
    return rows


# ------------------------------------------------------------------------------------------------ FLOPs
def step_flops(spec: BenchModel, lora_params: int, sequences: int, seq_len: int, response_len: int,
               reference_forward: bool) -> float:
    """FLOPs of one training step by the formula in the module docstring."""
    h, layers = spec.hidden, spec.layers
    body = layers * (spec.attention_weights + 3 * h * spec.intermediate)
    head = h * spec.vocab
    t_seq, t_out = sequences * seq_len, sequences * response_len
    frozen = 2 * body * t_seq + 4 * layers * h * seq_len * t_seq + 2 * head * t_out
    policy = 2 * frozen + 6 * lora_params * t_seq
    return policy + (frozen if reference_forward else 0)


# ------------------------------------------------------------------------------------------------ children
def _base(spec: BenchModel, seed: int, precision: str):
    """The frozen base, stored in bf16 for bf16 runs (as ``model.dtype=bf16`` loads it)."""
    import torch

    base = spec.build(seed)
    return base.to(torch.bfloat16) if precision == "bf16" else base


def _timed_steps(step, warmup: int, steps: int) -> tuple[float, list[float]]:
    """Run ``warmup`` then ``steps`` calls of ``step`` (returning the loss); (seconds per timed step, losses)."""
    losses = [step() for _ in range(warmup)]
    start = time.perf_counter()
    losses += [step() for _ in range(steps)]
    return (time.perf_counter() - start) / steps, losses


def _result(s_per_step: float, tokens_per_step: int, losses: list[float], trainable: int, **extra) -> dict:
    import torch

    return {"s_per_step": s_per_step, "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_step / s_per_step,
            "first_loss": losses[0], "last_loss": losses[-1], "trainable_params": trainable,
            "torch_threads": torch.get_num_threads(), **extra}


def dpo_ours(model: str, precompute: bool, steps: int, warmup: int, batch: int, prompt_len: int,
             response_len: int, lr: float, seed: int = 0, precision: str = "fp32") -> dict:
    """align's DPO trainer (``build_dpo_trainer``, policy adapter on the bare base as reference). ``precision``
    "bf16": the base stored in bf16 and the step under bf16 autocast (``trainer.precision=bf16``), fp32 adapters."""
    import datasets
    import torch

    from align.adapters import AdapterModel, LoraConfig
    from align.config.methods import DPOConfig
    from align.config.trainer import LoopConfig, OptimizerConfig
    from align.trainers import dpo as dpo_module

    spec = _spec(model)
    rows = preference_rows(spec.vocab, batch * (warmup + steps), prompt_len, response_len, seed)
    started = time.perf_counter()
    adapted = AdapterModel(_base(spec, seed, precision))
    torch.manual_seed(seed)  # the LoRA A matrices
    cfg = DPOConfig(beta=BETA, loss="sigmoid", reference=None, precompute_reference=precompute,
                    eval_batch_size=REF_BATCH)
    loop = LoopConfig(max_steps=warmup + steps, micro_batch_size=batch, progress=False, seed=seed,
                      precision=precision)
    optim = OptimizerConfig(lr=lr, schedule="constant", max_grad_norm=1.0)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS)
    reference_pass = {"s": 0.0}
    original = dpo_module.precompute_reference

    def timed_precompute(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            reference_pass["s"] += time.perf_counter() - t

    dpo_module.precompute_reference = timed_precompute  # build_dpo_trainer looks it up in its module
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            trainer = dpo_module.build_dpo_trainer(adapted, datasets.Dataset.from_list(rows), None, PAD, cfg, loop,
                                                   optim, out_dir, adapter_config=lora)
            setup_s = time.perf_counter() - started
            adapted.train()
            s_per_step, losses = _timed_steps(lambda: trainer.train_step()["loss"], warmup, steps)
    finally:
        dpo_module.precompute_reference = original
    trainable = sum(p.numel() for p in trainer.params.values())
    return _result(s_per_step, batch * (prompt_len + 2 * response_len), losses, trainable, setup_s=setup_s,
                   precompute_s=reference_pass["s"] if precompute else None)


def dpo_trl(model: str, precompute: bool, steps: int, warmup: int, batch: int, prompt_len: int,
            response_len: int, lr: float, seed: int = 0) -> dict:
    """TRL's ``DPOTrainer`` with a PEFT LoRA ``peft_config`` (reference = the adapter disabled)."""
    import datasets
    import peft
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    if warmup < 1:
        raise ValueError("warmup must be >= 1: TRL's timing starts at the end of the last warm-up step")
    spec = _spec(model)
    rows = preference_rows(spec.vocab, batch * (warmup + steps), prompt_len, response_len, seed)
    words = vocabulary(spec.vocab)
    texts = datasets.Dataset.from_list([as_text(row, words) for row in rows])
    started = time.perf_counter()
    base = spec.build(seed)

    class Timed(DPOTrainer):
        reference_pass_s = 0.0

        def _precompute_ref_logps(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*args, **kwargs)
            finally:
                self.reference_pass_s += time.perf_counter() - t

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.__dict__.setdefault("losses", []).append(float(loss))
            return loss

    class StepEnds(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out_dir:
        args = DPOConfig(
            output_dir=out_dir, max_steps=warmup + steps, per_device_train_batch_size=batch,
            gradient_accumulation_steps=1, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
            optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, seed=seed,
            use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            beta=BETA, loss_type=["sigmoid"], max_length=None, padding_free=False,
            precompute_ref_log_probs=precompute, precompute_ref_batch_size=REF_BATCH,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, dataloader_pin_memory=False,
        )
        lora = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                               target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        timer = StepEnds()
        trainer = Timed(model=base, args=args, train_dataset=texts, processing_class=word_tokenizer(spec.vocab),
                        peft_config=lora, callbacks=[timer])
        setup_s = time.perf_counter() - started
        if trainer.args.gradient_checkpointing or trainer.args.bf16:
            raise RuntimeError("TRL kept gradient checkpointing or bf16 on: the runs would not be like for like")
        _check_same_tokens(trainer.train_dataset, rows)
        trainer.train()
    ends = timer.ends
    if len(ends) != warmup + steps:
        raise RuntimeError(f"TRL ran {len(ends)} steps, expected {warmup + steps}")
    s_per_step = (ends[-1] - ends[warmup - 1]) / steps  # from the end of the last warm-up step
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return _result(s_per_step, batch * (prompt_len + 2 * response_len), trainer.losses, trainable, setup_s=setup_s,
                   precompute_s=trainer.reference_pass_s if precompute else None)


def _check_same_tokens(dataset, rows: list[dict]) -> None:
    """TRL tokenized the text into exactly our token ids (no EOS added, nothing merged or truncated)."""
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        theirs = [list(ids) for ids in dataset[key]]
        if theirs != [row[key] for row in rows]:
            raise RuntimeError(f"TRL's {key} differ from the benchmark's token ids: the comparison would be unfair")


def sft_ours(model: str, steps: int, warmup: int, batch: int, prompt_len: int, response_len: int,
             lr: float, seed: int = 0, precision: str = "fp32") -> dict:
    """align's SFT trainer on the sequences of a DPO step (2 x batch rows of prompt + response)."""
    import datasets
    import torch

    from align.adapters import AdapterModel, LoraConfig
    from align.config.methods import SFTConfig
    from align.config.trainer import LoopConfig, OptimizerConfig
    from align.trainers.sft import build_sft_trainer

    spec = _spec(model)
    rows = sft_rows(preference_rows(spec.vocab, batch * (warmup + steps), prompt_len, response_len, seed))
    adapted = AdapterModel(_base(spec, seed, precision))
    torch.manual_seed(seed)
    adapted.add_adapter("sft", LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS))
    loop = LoopConfig(max_steps=warmup + steps, micro_batch_size=2 * batch, progress=False, seed=seed,
                      precision=precision)
    optim = OptimizerConfig(lr=lr, schedule="constant", max_grad_norm=1.0)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = build_sft_trainer(adapted, datasets.Dataset.from_list(rows), None, PAD, SFTConfig(adapter="sft"),
                                    loop, optim, out_dir)
        adapted.train()
        s_per_step, losses = _timed_steps(lambda: trainer.train_step()["loss"], warmup, steps)
    trainable = sum(p.numel() for p in trainer.params.values())
    return _result(s_per_step, 2 * batch * (prompt_len + response_len), losses, trainable)


def rm_ours(model: str, steps: int, warmup: int, batch: int, prompt_len: int, response_len: int,
            lr: float, seed: int = 0) -> dict:
    """align's reward-model trainer (``build_reward_trainer``: a LoRA adapter + a scalar head read at the last
    token, Bradley-Terry loss) on the pairs of a DPO step."""
    import datasets
    import torch

    from align.adapters import AdapterModel, LoraConfig
    from align.config.methods import RewardConfig
    from align.config.trainer import LoopConfig, OptimizerConfig
    from align.models.heads import ScalarHead
    from align.trainers.reward_model import build_reward_trainer

    spec = _spec(model)
    rows = preference_rows(spec.vocab, batch * (warmup + steps), prompt_len, response_len, seed)
    adapted = AdapterModel(spec.build(seed))
    torch.manual_seed(seed)
    adapted.add_adapter("reward", LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS))
    head = ScalarHead(spec.hidden, "score")
    loop = LoopConfig(max_steps=warmup + steps, micro_batch_size=batch, progress=False, seed=seed)
    optim = OptimizerConfig(lr=lr, schedule="constant", max_grad_norm=1.0)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = build_reward_trainer(adapted, head, datasets.Dataset.from_list(rows), None, PAD,
                                       RewardConfig(adapter="reward"), loop, optim, out_dir)
        adapted.train()
        s_per_step, losses = _timed_steps(lambda: trainer.train_step()["loss"], warmup, steps)
    trainable = sum(p.numel() for n, p in trainer.params.items() if n.startswith("adapter."))
    return _result(s_per_step, batch * (prompt_len + 2 * response_len), losses, trainable)


def matmul_peak(size: int = 2048, iters: int = 10) -> dict:
    """GFLOP/s of a ``size``^3 matmul loop in fp32 and bf16 (2 warm-up products, then ``iters`` timed)."""
    import torch

    out = {"size": size, "torch_threads": torch.get_num_threads()}
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(0)
        a, b = (torch.randn(size, size, generator=gen).to(dtype) for _ in range(2))
        c = torch.empty(size, size, dtype=dtype)
        for _ in range(2):
            torch.mm(a, b, out=c)
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        out[f"{str(dtype).removeprefix('torch.')}_gflops"] = 2 * size**3 * iters / (time.perf_counter() - start) / 1e9
    return out


# ------------------------------------------------------------------------------------------------ parent
def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _run(function: str, kwargs: dict) -> dict:
    result = isolated(MODULE, function, kwargs, env=CHILD_ENV)
    what = (f"{result['float32_gflops']:.0f} GFLOP/s fp32, {result['bfloat16_gflops']:.0f} bf16"
            if function == "matmul_peak" else f"{result['s_per_step']:.3f} s/step")
    _log(f"{function}({kwargs.get('model', '')}{', precompute' if kwargs.get('precompute') else ''}): {what}, "
         f"peak RSS {result['peak_rss_mib']:.0f} MiB")
    return result


def measure(args) -> dict:
    started = time.perf_counter()
    names = ["5m", "25m"] if args.model == "all" else [args.model]
    peaks = [_run("matmul_peak", {"size": args.matmul_size})]
    results: dict = {"dpo": {}, "sft": {}, "rm": {}, "bf16": {}}
    for name in names:
        common = {"model": name, "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
                  "prompt_len": args.prompt_len, "response_len": args.response_len, "lr": args.lr}
        for mode, precompute in MODES.items():
            kwargs = {**common, "precompute": precompute}
            comparison = alternate(lambda kw=kwargs: _run("dpo_ours", kw), lambda kw=kwargs: _run("dpo_trl", kw),
                                   args.repeats)
            _check(comparison, name, mode)
            results["dpo"][(name, mode)] = comparison
        results["sft"][name] = [_run("sft_ours", common) for _ in range(args.repeats)]
        results["rm"][name] = [_run("rm_ours", common) for _ in range(args.repeats)]
        if args.bf16:  # align's bf16 steps, against the bf16 matmul peak
            bf16 = {**common, "precision": "bf16"}
            results["bf16"][name] = {
                "DPO, reference precomputed": [_run("dpo_ours", {**bf16, "precompute": True})
                                               for _ in range(args.repeats)],
                "SFT": [_run("sft_ours", bf16) for _ in range(args.repeats)]}
    peaks.append(_run("matmul_peak", {"size": args.matmul_size}))
    results["peaks"] = peaks
    results["minutes"] = (time.perf_counter() - started) / 60
    return results


def _check(comparison: Comparison, name: str, mode: str) -> None:
    """Both sides train the same number of weights and start from the same loss (policy = reference: log 2)."""
    ours, theirs = comparison.ours[0], comparison.theirs[0]
    if ours["trainable_params"] != theirs["trainable_params"]:
        raise RuntimeError(f"{name}/{mode}: LoRA sizes differ: ours {ours['trainable_params']:,}, "
                           f"TRL {theirs['trainable_params']:,}")
    for side, result in (("ours", ours), ("TRL", theirs)):
        if abs(result["first_loss"] - math.log(2)) > 1e-3:
            _log(f"warning: {name}/{mode} {side}'s first loss is {result['first_loss']:.5f}, not log 2")


def _target(value: float, ok: bool) -> str:
    return f"{value:.2f} ({'met' if ok else 'not met'})"


def dpo_table(results: dict) -> str:
    header = ["model", "reference log-probs", "s/step ours", "s/step TRL", "tokens/s ours", "tokens/s TRL",
              "tokens/s ours/TRL (target >= 1.5)", "peak RSS MiB ours", "peak RSS MiB TRL",
              "RSS ours/TRL (target <= 0.8)", "one-off reference pass s, ours / TRL"]
    rows = []
    for (name, mode), c in results["dpo"].items():
        speed, rss = c.ratio("tokens_per_s"), c.ratio("peak_rss_mib")
        reference = (f"{c.median('ours', 'precompute_s'):.2f} / {c.median('theirs', 'precompute_s'):.2f}"
                     if MODES[mode] else "-")
        rows.append([name, mode, c.median("ours", "s_per_step"), c.median("theirs", "s_per_step"),
                     c.median("ours", "tokens_per_s"), c.median("theirs", "tokens_per_s"), _target(speed, speed >= 1.5),
                     c.median("ours", "peak_rss_mib"), c.median("theirs", "peak_rss_mib"), _target(rss, rss <= 0.8),
                     reference])
    return table(header, rows)


def mfu_rows(results: dict, args) -> tuple[float, list[list]]:
    peak = max(p["float32_gflops"] for p in results["peaks"])
    bf16_peak = max(p["bfloat16_gflops"] for p in results["peaks"])
    seq_len = args.prompt_len + args.response_len
    rows = []

    def cells(s_per_step: float | None, flops: float, target: bool = False, peak: float = peak) -> list:
        if s_per_step is None:
            return ["-", "-", "-"]
        achieved = flops / s_per_step / 1e9
        mfu = f"{100 * achieved / peak:.1f}%"
        return [s_per_step, achieved, f"{mfu} ({'met' if achieved / peak >= MFU_TARGET else 'not met'})" if target
                else mfu]

    def flops_of(name: str, trainable: int, response_len: int, reference_forward: bool) -> float:
        return step_flops(_spec(name), trainable, 2 * args.batch, seq_len, response_len, reference_forward)

    for (name, mode), c in results["dpo"].items():
        flops = flops_of(name, c.ours[0]["trainable_params"], args.response_len, not MODES[mode])
        rows.append([name, f"DPO, reference {mode}", flops / 1e9,
                     *cells(c.median("ours", "s_per_step"), flops, target=name == MFU_MODEL),
                     *cells(c.median("theirs", "s_per_step"), flops)])
    for stage, response_len in (("sft", args.response_len), ("rm", 0)):  # the reward model scores no tokens
        for name, runs in results.get(stage, {}).items():
            flops = flops_of(name, runs[0]["trainable_params"], response_len, False)
            rows.append([name, stage.upper(), flops / 1e9,
                         *cells(statistics.median(r["s_per_step"] for r in runs), flops, target=name == MFU_MODEL),
                         *cells(None, flops)])
    for name, steps in results.get("bf16", {}).items():  # against the bf16 peak
        for step, runs in steps.items():
            flops = flops_of(name, runs[0]["trainable_params"], args.response_len, False)
            rows.append([name, f"{step}, bf16 (of the bf16 peak)", flops / 1e9,
                         *cells(statistics.median(r["s_per_step"] for r in runs), flops, target=name == MFU_MODEL,
                                peak=bf16_peak),
                         *cells(None, flops)])
    return peak, rows


def mfu_table(results: dict, args) -> tuple[float, str]:
    peak, rows = mfu_rows(results, args)
    header = ["model", "step", "GFLOP/step", "s/step ours", "GFLOP/s ours", "MFU ours (target >= 60% on 25m)",
              "s/step TRL", "GFLOP/s TRL", "MFU TRL"]
    return peak, table(header, rows)


def report(results: dict, args, info: dict) -> str:
    """The docs section: setup, the DPO table, the MFU table, what TRL's API forces. Prose wrapped at 115."""
    peak, mfu = mfu_table(results, args)
    names = list(dict.fromkeys(name for name, _ in results["dpo"]))
    bf16 = max(p["bfloat16_gflops"] for p in results["peaks"])
    sequences, seq_len = 2 * args.batch, args.prompt_len + args.response_len
    setup = (
        f"Same {'real pretrained' if names == ['smollm2'] else 'random-weight'} Llama on both sides ({'; '.join(describe(_spec(name)) for name in names)}), LoRA "
        f"r={LORA_R}, alpha={LORA_ALPHA}, dropout 0 on q/k/v/o/gate/up/down of every layer (not lm_head), the same "
        f"synthetic pairs (prompt {args.prompt_len} tokens, chosen and rejected {args.response_len} each, no "
        f"padding), {args.batch} pairs per step, no accumulation, fp32, AdamW (torch's, not fused), constant lr "
        f"{args.lr:g}, clipping at 1.0, sigmoid loss, beta {BETA}, reference = the base with the adapter off. "
        f"Figures are medians over {args.repeats} fresh process(es) per side, ours and TRL alternating; a process "
        f"runs {args.warmup} untimed then {args.steps} timed steps. tokens/s counts prompt + chosen + rejected "
        f"tokens ({args.batch * (args.prompt_len + 2 * args.response_len):,} per step); peak RSS is the whole "
        f"process's VmHWM. The one-off reference pass covers the run's {args.batch * (args.warmup + args.steps)} "
        f"pairs, {REF_BATCH} pairs per batch on both sides.")
    flops = (
        f"Model FLOP utilisation: measured matmul peak ({args.matmul_size}³, "
        f"{results['peaks'][0]['torch_threads']} threads) fp32 {peak:,.0f} GFLOP/s, bf16 {bf16:,.0f} GFLOP/s. "
        "FLOPs per step count the work the method needs, the same for both sides: with the frozen-base forward "
        "F = 2·N_body·T_seq + 4·L·H·S·T_seq + 2·N_head·T_out, a training step is 2·F + 6·N_lora·T_seq (forward, "
        "backward through the base without base weight gradients, LoRA weight gradients), plus F when the "
        "reference runs at every step. N_body = L·(4H² + 3H·I), N_head = H·V, N_lora = the LoRA weights, "
        f"T_seq = {sequences * seq_len:,} tokens in the forward ({sequences} sequences of S = {seq_len}), "
        f"T_out = {sequences * args.response_len:,} scored response positions. MFU = FLOPs per step / s per step / "
        "fp32 peak. The SFT step (align's `build_sft_trainer`) runs the same sequences, loss on the response tokens; the RM "
        "step (`build_reward_trainer`: LoRA + a scalar head at the last token, Bradley-Terry loss) the same pairs, "
        "with no output head (T_out = 0). The bf16 rows run align's steps with the base stored in bf16 under bf16 "
        "autocast (`model.dtype=bf16 trainer.precision=bf16`; fp32 adapters and optimizer) and divide by the bf16 "
        "peak.")
    differences = (
        "Differences TRL's API forces: TRL 1.16's `DPOTrainer` always tokenizes text itself (no pre-tokenized "
        "input), so it gets the pairs as strings over a local word-level tokenizer of the same vocabulary, and the "
        "benchmark checks that TRL's token ids equal the ones align trains on; 1.16 has no `max_prompt_length` "
        "(`max_length=None`: nothing is truncated). On CPU (no Triton) TRL's fused LM head scores every position, "
        "the prompt's included, over the whole vocabulary at once in fp32 torch tiles, and computes entropy, "
        "mean-logit and top-1 metrics in the same pass; this is where most of TRL's time and memory go at a 32k "
        "vocabulary, and the FLOP count does not credit it. TRL's defaults that would make the runs unequal are "
        "overridden: bf16 autocast (`bf16=False, use_cpu=True`), gradient checkpointing (off), fused AdamW "
        "(`optim=\"adamw_torch\"`), linear decay (`constant`), lr 1e-6. TRL's logging is off "
        "(`logging_strategy=\"no\"`); it still computes its metrics at every step, as align does.")
    header = (f"Command: `{args.command}`, run {info['date']} ({results['minutes']:.1f} min). "
              f"Machine: {machine_line(info)}.")
    prose = [textwrap.fill(text, 115, break_on_hyphens=False) for text in (header, setup, flops, differences)]
    return "\n\n".join(["## DPO: align vs TRL `DPOTrainer` + PEFT LoRA (`scripts/bench_dpo.py`)",
                         prose[0], prose[1], dpo_table(results), prose[2], mfu, prose[3]]) + "\n"


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="25m", choices=[*CHOICES, "all"],
                        help="a benchmark model, 'all' (5m and 25m), or 'tiny' to check the script runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per process, before the timed ones")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false",
                        help="skip align's bf16 DPO and SFT steps (MFU against the bf16 matmul peak)")
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    parser.add_argument("--write", action="store_true", help="write the tables into docs/benchmarks.md")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "scripts/bench_dpo.py", *(sys.argv[1:] if argv is None else argv)])
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1:
        parser.error("--steps, --warmup and --repeats must be >= 1 (the first step is never timed)")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    info = machine_info()
    _log(f"machine: {machine_line(info)}")
    results = measure(args)
    markdown = report(results, args, info)
    print(markdown)
    if args.json:
        raw = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": info, "peaks": results["peaks"],
               "dpo": {f"{n}/{m}": {"ours": c.ours, "theirs": c.theirs} for (n, m), c in results["dpo"].items()},
               "sft": results["sft"]}
        args.json.write_text(json.dumps(raw, indent=1))
    if args.write:
        section = "dpo" if args.model in ("all", "25m") else f"dpo-{args.model}"  # the real model: its own section
        write_section(section, markdown)
        _log(f"wrote the {section} section of docs/benchmarks.md")


if __name__ == "__main__":
    if not child_main(globals()):
        main()
