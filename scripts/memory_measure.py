"""Measured vs predicted memory of SFT steps on the CPU (docs/pipelines.md, "Memory per rank").

Loads a base (default: the converted SmolLM2-135M-Instruct) in fp32 on the CPU, adds a LoRA adapter, builds align's
SFT trainer on ``--rows`` random rows of ``--tokens`` tokens (every token after the first is a response token, the
worst case the prediction assumes; the last row of each batch one token shorter, so batches are padded) and runs ``--steps`` optimizer steps through the trainer's own step. Reports the
process's resident memory (VmRSS) before and after loading the base, and the peak (VmHWM, reset just before the
steps through /proc/self/clear_refs) over the steps, next to ``align.models.memory.predict`` for the same
workload. RSS counts allocator slack and freed-but-kept pages, so it is an upper bound on what tensors needed.

    python scripts/memory_measure.py [--model DIR] [--rows 2] [--tokens 256] [--steps 2] [--r 16]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import torch

from align.adapters import AdapterModel, LoraConfig
from align.config.methods import SFTConfig
from align.config.trainer import LoopConfig, OptimizerConfig
from align.models.loading import load_base
from align.models.memory import (
    MiB,
    ModelShape,
    Role,
    Setup,
    Workload,
    activation_parts,
    adapter_params,
    predict,
    saved_tensor_bytes,
)
from align.trainers.sft import build_sft_trainer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path.home() / ".cache/align/models/SmolLM2-135M-Instruct"))
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    gc.collect()
    before = status_kib("VmRSS") * 1024
    base, tok = load_base(args.model, dtype=torch.float32, device="cpu")
    with torch.no_grad():  # weights may still be pages of the mmapped file: read them all so they count now
        for param in base.parameters():
            param.sum()
    gc.collect()
    loaded = status_kib("VmRSS") * 1024
    settings = {"method": "lora", "r": args.r, "target_modules": TARGETS}
    model = AdapterModel(base)
    model.add_adapter("sft", LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=tuple(TARGETS)))
    gen = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    lengths = [args.tokens - (i % args.rows == args.rows - 1) for i in range(args.rows * args.steps)]
    rows = [{"input_ids": torch.randint(3, vocab, (n,), generator=gen).tolist(),  # the last row of each batch
             "response_mask": [False] + [True] * (n - 1)} for n in lengths]       # is padded by one token
    loop = LoopConfig(max_steps=args.steps, micro_batch_size=args.rows, progress=False)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_sft_trainer(model, rows, None, tok.pad_token_id, SFTConfig(), loop, OptimizerConfig(), out)
        model.train()
        gc.collect()
        start = status_kib("VmRSS") * 1024
        reset_peak()
        with saved_tensor_bytes(model.parameters()) as saved:  # what autograd keeps in the first step's forward
            trainer.train_step()
        for _ in range(args.steps - 1):
            trainer.train_step()
        peak = status_kib("VmHWM") * 1024
    shape = ModelShape.from_config(json.loads((Path(args.model) / "config.json").read_text()))
    work = Workload(args.rows, args.tokens, sum(lengths[:args.rows]) - args.rows, padded=args.rows > 1)
    pred = predict("sft", shape, [Role("sft", settings, True)], work, Setup())
    parts = activation_parts(shape, adapter_params(shape, settings), work)
    growth = pred.grads + pred.optimizer + pred.activations
    report = {
        "workload": f"{args.rows} rows x {args.tokens} tokens, LoRA r={args.r} on {len(TARGETS)} projections, "
                    f"{args.steps} steps, {torch.get_num_threads()} threads",
        "base: RSS growth when loading (MiB)": round((loaded - before) / MiB, 1),
        "base: predicted (MiB)": round(pred.base / MiB, 1),
        "step 1: tensors autograd saved (MiB)": round(saved["bytes"] / MiB, 1),
        "step 1: predicted saved activations (MiB)": round(parts["saved"] / MiB, 1),
        "steps: peak RSS growth over the loaded base + adapter (MiB)": round((peak - start) / MiB, 1),
        "steps: predicted grads + optimizer + activations (MiB)": round(growth / MiB, 1),
        "predicted parts (MiB)": {k: round(getattr(pred, k) / MiB, 1) for k in
                                  ("adapters", "grads", "optimizer", "activations")},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
