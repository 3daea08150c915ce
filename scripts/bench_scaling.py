"""How align's DPO training step scales: step time and peak memory against sequence length and model size.

Each point is one fresh process (``bench_common.isolated``) that builds a Llama benchmark model (32k vocabulary,
seeded random weights), wraps it in an ``AdapterModel`` with a frozen "sft" LoRA adapter (r=16, alpha=32, all
linear layers) and builds align's DPO trainer on it (``align.trainers.dpo.build_dpo_trainer``: the policy is a
trainable copy of "sft", the reference is "sft", ``precompute_reference=True`` so the reference log-probs are
computed once while building, sigmoid loss, beta 0.1, AdamW lr 1e-5, fp32). It then times ``warmup + steps``
calls of ``trainer.train_step()`` (one optimizer step over one micro-batch of ``--pairs`` preference pairs, i.e.
2 x pairs sequences of a ``--prompt``-token prompt plus an L-token response; every row has the same lengths).

Two axes, three points each (the shared point is measured once):
    length  the 5m model (hidden 64, 4 layers), response length L = 64, 128, 256 tokens
    size    L = 128, hidden 64 / 128 / 256 (4 layers, heads = hidden / 16, intermediate = hidden x 43 / 16),
            32k vocabulary: 4.3M / 9.0M / 19.5M parameters (the vocabulary's two matrices dominate)

Per point: the step time is the median of the timed steps (median over ``--repeats`` processes); memory is
    step memory      the high-water mark during the steps (VmHWM reset after building) minus the RSS before the
                     first step: what the step itself adds (activations, gradients, optimizer state, temporaries)
    above runtime    the whole process's peak RSS minus the RSS after imports and before building the model
                     (the Python/torch runtime): weights, adapters, precomputation and the step together
Exponents are least-squares slopes on log-log: time ~ L^a and memory ~ L^b on the length axis, and the same against
the parameter count on the size axis.

    python scripts/bench_scaling.py [--repeats 3] [--steps 6] [--write]

Expected time on 2 quiet cores with the defaults: about 3-4 minutes (5 points x 3 repeats = 15 processes of
10-15 s: ~8 s of imports, building and precomputing the reference, then 7 steps of 0.1-0.5 s).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, whether run as a file or with -m

from bench_common import (  # noqa: E402
    BENCHMARKS_MD,
    BenchModel,
    child_main,
    isolated,
    machine_info,
    machine_line,
    reset_peak,
    status_mib,
    table,
    write_section,
)

MODULE = "scripts.bench_scaling"
PAD = 0
RANK, ALPHA, LR = 16, 32, 1e-5
LENGTHS = (64, 128, 256)
HIDDENS = (64, 128, 256)
FIXED_LENGTH, FIXED_HIDDEN, LAYERS = 128, 64, 4


def bench_model(hidden: int) -> BenchModel:
    """hidden 64 is MODELS['5m'] (intermediate 172); the others keep its shape ratios."""
    return BenchModel(f"h{hidden}", hidden=hidden, layers=LAYERS, heads=hidden // 16, intermediate=hidden * 43 // 16)


# ------------------------------------------------------------------------------------------------ child side
def preference_rows(n: int, prompt: int, length: int, vocab: int) -> list[dict]:
    """``n`` rows of random tokens: a ``prompt``-token prompt, chosen and rejected responses of ``length`` tokens."""
    import torch

    gen = torch.Generator().manual_seed(0)

    def tokens(k: int) -> list[int]:
        return torch.randint(3, vocab, (k,), generator=gen).tolist()

    return [{"prompt_ids": tokens(prompt), "chosen_ids": tokens(length), "rejected_ids": tokens(length)}
            for _ in range(n)]


def measure_point(hidden: int, length: int, prompt: int, pairs: int, steps: int, warmup: int) -> dict:
    """Build the DPO trainer for one point and time its steps, in this (fresh) process."""
    import shutil
    import tempfile

    import datasets
    import torch

    from align.adapters import AdapterModel, LoraConfig
    from align.config.methods import DPOConfig
    from align.config.trainer import LoopConfig, OptimizerConfig
    from align.trainers.dpo import build_dpo_trainer

    rss_runtime = status_mib("VmRSS")
    bench = bench_model(hidden)
    model = AdapterModel(bench.build(seed=0))
    torch.manual_seed(1)
    model.add_adapter("sft", LoraConfig(r=RANK, lora_alpha=ALPHA), trainable=False)
    rows = datasets.Dataset.from_list(preference_rows(pairs * (warmup + steps), prompt, length, bench.vocab))
    out_dir = tempfile.mkdtemp(prefix="bench-scaling-")
    try:
        cfg = DPOConfig(reference="sft", precompute_reference=True, eval_batch_size=pairs)
        trainer = build_dpo_trainer(model, rows, None, PAD, cfg,
                                    LoopConfig(max_steps=warmup + steps, micro_batch_size=pairs, progress=False),
                                    OptimizerConfig(lr=LR), out_dir)
        model.train()
        rss_built, build_peak = status_mib("VmRSS"), status_mib("VmHWM")
        reset = reset_peak()
        times, losses = [], []
        for i in range(warmup + steps):
            start = time.perf_counter()
            metrics = trainer.train_step()
            elapsed = time.perf_counter() - start
            losses.append(metrics["loss"])
            if i >= warmup:
                times.append(elapsed)
        step_peak = status_mib("VmHWM")
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    trainable = sum(p.numel() for p in model.adapter_parameters("policy"))
    return {"hidden": hidden, "length": length, "parameters": bench.parameters, "trainable": trainable,
            "step_s": statistics.median(times), "steps_s": [round(t, 4) for t in times],
            "tokens": 2 * pairs * (prompt + length), "loss_first": losses[0], "loss_last": losses[-1],
            "rss_runtime_mib": round(rss_runtime, 1), "rss_built_mib": round(rss_built, 1),
            "build_peak_mib": round(build_peak, 1), "step_mib": round(step_peak - rss_built, 1) if reset else None,
            "above_runtime_mib": round(max(build_peak, step_peak) - rss_runtime, 1),
            "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------- parent side
def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x (nan if any y is not positive)."""
    if any(y is None or not y > 0 for y in ys):
        return float("nan")
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else None


def report(args, info: dict, points: dict[tuple[int, int], list[dict]], seconds: float) -> str:
    med = {p: {k: _median(runs, k) for k in ("step_s", "step_mib", "above_runtime_mib", "rss_built_mib")}
           for p, runs in points.items()}
    axes = {"length": [(FIXED_HIDDEN, L) for L in args.lengths], "size": [(h, args.fixed_length) for h in args.hiddens]}
    rows = []
    for axis, keys in axes.items():
        for hidden, length in keys:
            m, first = med[(hidden, length)], points[(hidden, length)][0]
            rows.append([axis, hidden, f"{first['parameters'] / 1e6:.1f}M", length, first["tokens"],
                         f"{m['step_s']:.3f}", f"{first['tokens'] / m['step_s']:,.0f}",
                         f"{m['step_mib']:,.0f}" if m["step_mib"] is not None else "n/a",
                         f"{m['above_runtime_mib']:,.0f}"])
    exps = []
    for axis, keys in axes.items():
        xs = [float(L) for _, L in keys] if axis == "length" else [float(points[k][0]["parameters"]) for k in keys]
        exps.append([axis, "response length L" if axis == "length" else "parameter count",
                     f"{loglog_slope(xs, [med[k]['step_s'] for k in keys]):.2f}",
                     f"{loglog_slope(xs, [med[k]['step_mib'] for k in keys]):.2f}",
                     f"{loglog_slope(xs, [med[k]['above_runtime_mib'] for k in keys]):.2f}"])
    cmd = "python scripts/bench_scaling.py " + " ".join(sys.argv[1:])
    threads = sorted({r["threads"] for runs in points.values() for r in runs})
    return "\n".join([
        "## DPO step scaling: sequence length and model size (`scripts/bench_scaling.py`)",
        "",
        f"align's DPO trainer (`build_dpo_trainer`, policy = trainable copy of a frozen LoRA r={RANK} alpha={ALPHA} "
        "all-linear \"sft\" adapter, which is also the reference; reference log-probs precomputed; sigmoid loss; "
        f"AdamW; fp32) on Llama models with a 32k vocabulary and {LAYERS} layers. One step = `train_step()` on "
        f"{args.pairs} preference pair(s) ({2 * args.pairs} sequences of a {args.prompt}-token prompt + an L-token "
        "response). "
        f"Time: median of {args.steps} steps after {args.warmup} warm-up, median over {args.repeats} fresh "
        "process(es) per point. Step memory: high-water mark during the steps minus the RSS before them. Above "
        "runtime: the process's peak RSS minus its RSS after imports (weights, adapters, precomputation, step). "
        f"Length axis: hidden {FIXED_HIDDEN} (the `5m` model); size axis: L = {args.fixed_length}.",
        "",
        table(["axis", "hidden", "parameters", "L", "tokens/step", "s/step", "tokens/s", "step MiB",
               "above runtime MiB"], rows),
        "",
        "Exponents (least-squares slope on log-log over the three points of each axis):",
        "",
        table(["axis", "x", "time ~ x^a: a", "step memory ~ x^b: b", "above runtime ~ x^b: b"], exps),
        "",
        f"Run {info['date']} in {seconds / 60:.1f} min: `{cmd.strip()}`; torch threads per process "
        f"{', '.join(map(str, threads))}. Machine: {machine_line(info)}.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs=3, default=list(LENGTHS), help="response lengths (hidden 64)")
    parser.add_argument("--hiddens", type=int, nargs=3, default=list(HIDDENS), help="hidden sizes (multiples of 16)")
    parser.add_argument("--fixed-length", type=int, default=FIXED_LENGTH, help="response length on the size axis")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per point")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_MD, help="the markdown file --write updates")
    args = parser.parse_args()
    if any(h % 16 for h in args.hiddens):
        parser.error("--hiddens must be multiples of 16 (heads of 16 dimensions)")

    info = machine_info()
    keys = list(dict.fromkeys([(FIXED_HIDDEN, L) for L in args.lengths] +
                              [(h, args.fixed_length) for h in args.hiddens]))
    points: dict[tuple[int, int], list[dict]] = {k: [] for k in keys}
    started = time.perf_counter()
    for i in range(args.repeats):
        for hidden, length in keys if i % 2 == 0 else keys[::-1]:  # alternate the order between repeats
            points[(hidden, length)].append(isolated(MODULE, "measure_point", {
                "hidden": hidden, "length": length, "prompt": args.prompt, "pairs": args.pairs,
                "steps": args.steps, "warmup": args.warmup}))
        print(f"repeat {i + 1}/{args.repeats} done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    markdown = report(args, info, points, time.perf_counter() - started)
    print(markdown)
    if args.write:
        write_section("scaling", markdown, args.doc)


if __name__ == "__main__":
    if not child_main(globals()):
        main()
