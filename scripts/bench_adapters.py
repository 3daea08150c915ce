"""Adapter layers, ours vs PEFT: training-step time and peak memory of LoRA, DoRA and LoRA on a 4-bit NF4 base.

Every measurement is one fresh process (``bench_common.isolated``) that builds the benchmark model (MODELS["25m"]
by default: Llama, hidden 256, 10 layers, 32k vocabulary, seeded random weights, so both sides hold the same base),
wraps it with one side's adapter and runs ``warmup + steps`` training steps on one fixed batch (``--batch`` x
``--seq`` random tokens, the same on every side). Sides:

    ours   align.adapters.AdapterModel + LoraConfig(r=16, lora_alpha=32, lora_dropout=0, target_modules=TARGETS,
           use_dora=...) — adapter "a" active
    peft   peft.get_peft_model(base, peft.LoraConfig(...the same fields..., task_type="CAUSAL_LM"))
    base   the bare frozen base: no adapter; a forward hook makes the input-embedding output require grad (as
           transformers' ``enable_input_require_grads`` does), so backward runs through every layer of the base.
           This is the floor any adapter method pays: each side's "overhead" is its time (memory) over this.

A step (timed with ``time.perf_counter``, the same code on every side) is
``optimizer.zero_grad(set_to_none=True)``; ``loss = model(input_ids=ids, labels=ids).loss`` (the model's own causal-LM
loss over the 32k vocabulary); ``loss.backward()``; ``optimizer.step()`` with ``torch.optim.AdamW(lr=1e-4)`` over the
side's trainable parameters (the bare base has none: no optimizer). fp32 compute throughout (the NF4 layers compute
in fp32). The reported time is the median of the ``--steps`` steps after ``--warmup`` warm-up steps; over the
``--repeats`` processes of a side the median of those medians is reported.

Memory: peak RSS (VmHWM) of the process, which did nothing but import, build and train; and "step peak above built":
the high-water mark during the steps (VmHWM reset after building) minus the RSS before the first step, i.e. what
the training step itself adds (activations, gradients, AdamW state, temporaries). The whole-process peak includes
each side's imports (PEFT's process imports peft; ours imports align.adapters), which the second figure excludes.

NF4: both sides quantize the same base the same way, once per process: ``align.models.quantize_linear_layers(base,
"nf4")`` (bitsandbytes ``Linear4bit``, fp32 compute dtype, ``lm_head`` kept dense). PEFT wraps those layers with its
own bitsandbytes LoRA layer (``peft.tuners.lora.bnb.Linear4bit``; it dispatches there only when the model says
``is_loaded_in_4bit``, which transformers would set when loading with a ``BitsAndBytesConfig``, so we set it). ours
wraps them through ``align.adapters.base_layers``. bitsandbytes' CPU repack (an inference kernel with no autograd,
used in eval mode on inputs without grad: see ``/work/shared/STACK.md``) is switched off on every ``Linear4bit`` on
every side: AdapterModel does it itself (``support_avx512bf16_for_cpu = False``), and this script sets the same flag
on the PEFT and bare-base processes' layers, so all sides run bitsandbytes' same dequantize-and-matmul path. Each
process checks, and the parent refuses the run otherwise, that no layer was repacked and the flags agree. PEFT's
4-bit LoRA layer clones the base layer's output before adding the update (its "defensive clone"); that is PEFT as it
ships, and it is kept.

Sanity checks run in the parent (not timings): both sides train the same number of parameters, and their first
losses agree (B starts at zero, so both equal the bare base's loss).

Ours and PEFT alternate (A B A B across repeats; every method and the bare bases are measured once per repeat, so
drifts in machine load hit all of them). Ratios are ours / PEFT of the medians; the target is <= 1.0x.

    python scripts/bench_adapters.py [--model 5m|25m] [--repeats 3] [--steps 10] [--batch 4 --seq 256]
                                     [--methods lora dora lora-nf4 dora-nf4] [--write]

Expected time on 2 quiet cores with the defaults (25m, 4 x 256 tokens, 3 methods, 3 repeats, 2 + 10 steps):
3 x (2 bare bases + 3 methods x 2 sides) = 24 processes of about 15 s (imports and build ~6 s, a step ~0.7 s), about
6 minutes; ``--batch 8`` (2,048 tokens a step) about 10 minutes; ``--model 5m`` about 3. These are estimates (FLOP
counts, and one contended single-thread 25m step of 2,048 tokens: 7.3 s); the progress lines on stderr give the
remaining time after each repeat. The 32k-vocabulary logits dominate the step's memory (a 25m step of 2,048 tokens
adds about 1.8 GB over the built model, on every side), so adapter differences are a small part of the peak.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, whether run as a file or with -m

from bench_common import (  # noqa: E402
    BENCHMARKS_MD,
    MODELS,
    Comparison,
    child_main,
    isolated,
    machine_info,
    machine_line,
    reset_peak,
    status_mib,
    table,
    write_section,
)

MODULE = "scripts.bench_adapters"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, LR = 16, 32, 1e-4
# method -> (use_dora, quantization of the base)
METHODS = {"lora": (False, None), "dora": (True, None), "lora-nf4": (False, "nf4"), "dora-nf4": (True, "nf4")}
DEFAULT_METHODS = ("lora", "dora", "lora-nf4")


# ------------------------------------------------------------------------------------------------ child side
def _ours(base, dora: bool):
    import torch

    from align.adapters import AdapterModel, LoraConfig

    model = AdapterModel(base)  # freezes the base and switches the 4-bit repack off on every Linear4bit
    torch.manual_seed(1)
    model.add_adapter("a", LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                                      use_dora=dora))
    model.set_active("a")
    wrappers = {type(layer.adapters["a"]).__name__ for layer in model.layers_of("a").values()}
    return model, model.adapter_parameters("a"), wrappers


def _peft(base, dora: bool, quantized: bool):
    import peft
    import torch

    if quantized:
        base.is_loaded_in_4bit = True  # as a BitsAndBytesConfig load sets it: PEFT then uses its bnb LoRA layer
    torch.manual_seed(1)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, use_dora=dora,
                             bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config)
    wrappers = {f"{type(m).__module__.rsplit('.', 1)[-1]}.{type(m).__name__}" for m in model.modules()
                if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    return model, [p for p in model.parameters() if p.requires_grad], wrappers


def _linear4bit_state(model, quantized: bool) -> dict:
    """Kernel-path facts of every bitsandbytes Linear4bit (not PEFT's wrapper of the same class name): the values
    of the repack flag and how many layers were repacked for the inference kernel."""
    flags, repacked, count = set(), 0, 0
    if quantized:
        import bitsandbytes as bnb

        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                count += 1
                flags.add(bool(m.support_avx512bf16_for_cpu))
                repacked += bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
    return {"linear4bit": count, "repack_flags": sorted(flags), "repacked": repacked}


def measure(side: str, model: str, dora: bool, quant: str | None, batch: int, seq: int, steps: int,
            warmup: int) -> dict:
    """One side's training steps in this (fresh) process; see the module docstring."""
    import torch
    from transformers import LlamaForCausalLM  # noqa: F401 - the runtime every side needs, before the baseline

    rss_runtime = status_mib("VmRSS")
    bench = MODELS[model]
    base = bench.build(seed=0)
    if quant:
        from align.models.quantize import quantize_linear_layers

        quantize_linear_layers(base, quant)
        if side != "ours":  # AdapterModel does this itself for ours; the same kernel path for every side
            import bitsandbytes as bnb

            for m in base.modules():
                if isinstance(m, bnb.nn.Linear4bit):
                    m.support_avx512bf16_for_cpu = False
    if side == "ours":
        net, params, wrappers = _ours(base, dora)
    elif side == "peft":
        net, params, wrappers = _peft(base, dora, quant is not None)
    elif side == "base":
        net, params, wrappers = base, [], set()
        base.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    else:
        raise ValueError(side)
    net.train()
    optimizer = torch.optim.AdamW(params, lr=LR) if params else None
    ids = torch.randint(3, bench.vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    rss_built, build_peak = status_mib("VmRSS"), status_mib("VmHWM")
    reset = reset_peak()

    times, losses = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        if i >= warmup:
            times.append(elapsed)
    step_peak = status_mib("VmHWM")
    return {"side": side, "dora": dora, "quant": quant, "step_s": statistics.median(times),
            "steps_s": [round(t, 4) for t in times], "loss0": losses[0],
            "trainable": sum(p.numel() for p in params),
            "wrappers": sorted(wrappers), "rss_runtime_mib": round(rss_runtime, 1),
            "rss_built_mib": round(rss_built, 1),
            "build_peak_mib": round(build_peak, 1), "peak_mib": round(max(build_peak, step_peak), 1),
            "step_above_built_mib": round(step_peak - rss_built, 1) if reset else None,
            "threads": torch.get_num_threads(), **_linear4bit_state(net, quant is not None)}


# ----------------------------------------------------------------------------------------------- parent side
def _run(side: str, method: str | None, quant: str | None, args) -> dict:
    dora = METHODS[method][0] if method else False
    return isolated(MODULE, "measure", {"side": side, "model": args.model, "dora": dora, "quant": quant,
                                        "batch": args.batch, "seq": args.seq, "steps": args.steps,
                                        "warmup": args.warmup})


def _check(method: str, comparison: Comparison, bases: list[dict]) -> None:
    """Refuse results that do not compare like with like (not a timing check)."""
    ours, theirs = comparison.ours, comparison.theirs
    counts = {r["trainable"] for r in ours + theirs}
    if len(counts) != 1:
        raise SystemExit(f"{method}: ours and PEFT train different parameter counts {sorted(counts)}")
    for r in ours + theirs + bases:
        if r["repacked"]:
            raise SystemExit(f"{method}: {r['side']} ran {r['repacked']} repacked 4-bit layers (inference kernel)")
    flags = {tuple(r["repack_flags"]) for r in ours + theirs + bases}
    if len(flags) != 1:
        raise SystemExit(f"{method}: the sides' bitsandbytes repack flags differ: {flags}")
    gap = abs(statistics.median(r["loss0"] for r in ours) - statistics.median(r["loss0"] for r in theirs))
    if gap > 1e-4:
        raise SystemExit(f"{method}: first losses differ by {gap:.2e}: the sides do not compute the same model")


def _median(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if r[key] is not None]  # step_above_built is None where VmHWM cannot be reset
    return statistics.median(values) if values else float("nan")


def report(args, info: dict, comparisons: dict[str, Comparison], bases: dict, seconds: float) -> str:
    bench = MODELS[args.model]
    tokens = args.batch * args.seq
    base_label = {None: "fp32", "nf4": "NF4"}
    time_rows, mem_rows = [], []
    for quant, runs in bases.items():
        step = _median(runs, "step_s")
        time_rows.append([f"bare base ({base_label[quant]})", f"{step:.3f}", "", "", "", "", f"{tokens / step:,.0f}"])
        mem_rows.append([f"bare base ({base_label[quant]})", f"{_median(runs, 'peak_mib'):,.0f}", "", "",
                         f"{_median(runs, 'step_above_built_mib'):,.0f}", "", "", "", ""])
    for method, c in comparisons.items():
        quant = METHODS[method][1]
        base_step, base_mem = _median(bases[quant], "step_s"), _median(bases[quant], "step_above_built_mib")
        ours_s, peft_s = c.median("ours", "step_s"), c.median("theirs", "step_s")
        time_rows.append([method, f"{ours_s:.3f}", f"{peft_s:.3f}", f"**{c.ratio('step_s'):.3f}**",
                          f"{ours_s / base_step:.2f}x", f"{peft_s / base_step:.2f}x", f"{tokens / ours_s:,.0f}"])
        ours_step, peft_step = _median(c.ours, "step_above_built_mib"), _median(c.theirs, "step_above_built_mib")
        mem_rows.append([method, f"{c.median('ours', 'peak_mib'):,.0f}", f"{c.median('theirs', 'peak_mib'):,.0f}",
                         f"**{c.ratio('peak_mib'):.3f}**", f"{ours_step:,.0f}", f"{peft_step:,.0f}",
                         f"{ours_step / peft_step:.3f}", f"{ours_step - base_mem:+,.0f}",
                         f"{peft_step - base_mem:+,.0f}"])
    trainable = {m: c.ours[0]["trainable"] for m, c in comparisons.items()}
    wrappers = {m: (c.ours[0]["wrappers"], c.theirs[0]["wrappers"]) for m, c in comparisons.items()}
    cmd = "python scripts/bench_adapters.py " + " ".join(sys.argv[1:])
    threads = {r["threads"] for c in comparisons.values() for r in c.ours + c.theirs}
    lines = [
        "## Adapter layers vs PEFT: LoRA, DoRA, LoRA on NF4 (`scripts/bench_adapters.py`)",
        "",
        f"Model `{bench.name}`: Llama, hidden {bench.hidden}, {bench.layers} layers, intermediate "
        f"{bench.intermediate}, vocabulary {bench.vocab:,} ({bench.parameters / 1e6:.1f}M parameters), "
        f"{'the real pretrained weights (SmolLM2-135M-Instruct)' if bench.name == 'smollm2' else 'seeded random weights'}. Adapters r={RANK}, alpha={ALPHA}, dropout 0 on q, k, v, o, gate, up, down "
        f"(trainable: {', '.join(f'{m} {n:,}' for m, n in trainable.items())}; equal on both sides). One step = "
        f"zero_grad + causal-LM loss (labels = inputs) + backward + AdamW step (lr {LR}) on the adapter, fp32, "
        f"batch {args.batch} x {args.seq} = {tokens:,} tokens. Bare base: no adapter, backward through every "
        "layer to the input embeddings (the floor of any adapter). Time: median of "
        f"{args.steps} steps after {args.warmup} warm-up, median over {args.repeats} fresh process(es) per side, "
        "ours and PEFT alternating (A B A B). Peak: VmHWM of the whole process (imports, build, steps); "
        "step: the high-water mark during the steps minus the RSS before them. NF4: the same "
        "`quantize_linear_layers` base on every side, bitsandbytes' CPU repack off on every `Linear4bit` on every "
        "side (same kernel path; no layer was repacked). Wrappers: "
        + "; ".join(f"{m}: ours {'/'.join(o)}, PEFT {'/'.join(p)}" for m, (o, p) in wrappers.items()) + ".",
        "",
        "Time per step (s) and overhead over the bare base:",
        "",
        table(["method", "ours s/step", "PEFT s/step", "ours / PEFT", "ours / bare", "PEFT / bare", "ours tokens/s"],
              time_rows),
        "",
        "Memory (MiB; \"step - bare\": the step memory over the bare base's, what the adapter adds while training):",
        "",
        table(["method", "ours peak RSS", "PEFT peak RSS", "ours / PEFT", "ours step", "PEFT step",
               "step ours / PEFT", "ours step - bare", "PEFT step - bare"], mem_rows),
        "",
        f"Run {info['date']} in {seconds / 60:.1f} min: `{cmd.strip()}`; torch threads per process "
        f"{', '.join(map(str, sorted(threads)))}. Machine: {machine_line(info)}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="25m")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(DEFAULT_METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per side and method")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_MD, help="the markdown file --write updates")
    args = parser.parse_args()

    info = machine_info()
    quants = list(dict.fromkeys(METHODS[m][1] for m in args.methods))
    processes = args.repeats * (len(quants) + 2 * len(args.methods))
    print(f"{args.model}: {len(args.methods)} methods x 2 sides + {len(quants)} bare base(s), {args.repeats} repeats "
          f"= {processes} processes of {args.warmup} + {args.steps} steps on {args.batch} x {args.seq} tokens",
          file=sys.stderr)
    started = time.perf_counter()
    results = {m: {"ours": [], "theirs": []} for m in args.methods}
    bases: dict = {q: [] for q in quants}
    done = 0
    for i in range(args.repeats):
        for quant in quants:
            bases[quant].append(_run("base", None, quant, args))
            done += 1
        for method in args.methods:
            order = ("ours", "peft") if i % 2 == 0 else ("peft", "ours")
            for side in order:
                results[method]["ours" if side == "ours" else "theirs"].append(
                    _run(side, method, METHODS[method][1], args))
                done += 1
        elapsed = time.perf_counter() - started
        print(f"repeat {i + 1}/{args.repeats} done: {done}/{processes} processes in {elapsed:.0f} s "
              f"(about {elapsed / done * (processes - done):.0f} s left)", file=sys.stderr)
    comparisons = {m: Comparison(r["ours"], r["theirs"]) for m, r in results.items()}
    for method, c in comparisons.items():
        _check(method, c, bases[METHODS[method][1]])
    markdown = report(args, info, comparisons, bases, time.perf_counter() - started)
    print(markdown)
    if args.write:
        write_section("adapters" if args.model == "25m" else f"adapters-{args.model}", markdown, args.doc)


if __name__ == "__main__":
    if not child_main(globals()):
        main()
