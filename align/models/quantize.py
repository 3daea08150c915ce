"""Quantize a model's Linear layers in place with bitsandbytes (NF4/FP4 4-bit or int8).

For real checkpoints prefer transformers' ``BitsAndBytesConfig`` at load time; this helper quantizes a model that
is already in memory (tiny test models, a base built from a config) with the same bitsandbytes layers.
"""

from __future__ import annotations

import torch
from torch import nn

# bitsandbytes' AVX-512 bf16 inference kernel tiles a 4-bit weight's output rows in blocks of this many.
_CPU_REPACK_BLOCK_N = 32


def quantize_linear_layers(model: nn.Module, mode: str = "nf4", compute_dtype: torch.dtype = torch.float32,
                           skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` (except those whose name ends with an entry of ``skip``) by a bitsandbytes layer.
    mode: 'nf4' | 'fp4' (Linear4bit) or 'int8' (Linear8bitLt, weights kept in int8).

    Each new layer takes the train/eval mode of the layer it replaces (a fresh module would start in train mode,
    and bitsandbytes computes differently in each)."""
    import bitsandbytes as bnb

    if mode not in ("nf4", "fp4", "int8"):
        raise ValueError(f"quantization mode must be 'nf4', 'fp4' or 'int8', got {mode!r}")
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and not name.endswith(skip)]
    for name, linear in targets:
        device = linear.weight.device
        if mode == "int8":
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=0.0)
            q.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, quant_type=mode)
            q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=mode,
                                         module=q)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        q = q.to(device)  # quantizes
        if mode != "int8" and not _cpu_repack_fits(q):
            q.support_avx512bf16_for_cpu = False
        q.train(linear.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return model


def _cpu_repack_fits(layer: nn.Module) -> bool:
    """Whether bitsandbytes can repack this 4-bit layer for its CPU inference kernel.

    On CPUs with AVX-512 bf16, the first eval-mode call on an input that does not require grad repacks the weight,
    reshaping the block scales to (out, in / blocksize) and tiling outputs by 32; other shapes crash there
    (``N must be divisible by block_n``, ``shape '[32, 0]' is invalid``). Such layers keep the plain path, which
    costs nothing: they could never use the fast kernel. Shapes that fit keep bitsandbytes' own setting, as a model
    loaded by transformers would.
    """
    blocksize = layer.weight.quant_state.blocksize
    return layer.in_features % blocksize == 0 and layer.out_features % _CPU_REPACK_BLOCK_N == 0
