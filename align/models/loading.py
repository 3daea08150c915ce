"""Load a base model and its tokenizer from a local path (or a hub name when online), optionally quantized."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

QUANTIZATIONS = ("none", "nf4", "int8")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:  # Llama-style tokenizers ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(path: str | Path, quantization: str = "none", dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", attn_implementation: str = "auto"):
    """The frozen base for every role, and its tokenizer. quantization: 'none', 'nf4' (4-bit, QLoRA) or 'int8'.
    ``device``: where the base lives ('cpu', 'cuda', 'cuda:1'); adapters are created beside their layers.
    ``attn_implementation``: 'auto' (the model's default) or a transformers attention kernel ('sdpa', 'eager',
    'flash_attention_2')."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"model.quantization={quantization!r}: expected one of {QUANTIZATIONS}")
    if not Path(path).exists() and Path(path).is_absolute():
        raise FileNotFoundError(f"model.path={path}: no such directory (align never downloads from a path)")
    kwargs: dict = {"dtype": dtype}
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    if quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
            if quantization == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
    device = torch.device(device)
    if quantization != "none" and device.type == "cuda":
        kwargs["device_map"] = {"": device}  # bitsandbytes quantizes as the weights land on the GPU
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        raise ValueError(f"model.path={path}: its weights do not match its config.json (tensors of another "
                         "shape than the config gives; transformers' report above names them). Point model.path "
                         "at a complete model directory (config.json and all weight files of the same model)"
                         ) from None
    check_loading_info(path, info)
    if quantization == "none":
        model.to(device)
    model.requires_grad_(False)
    return model.eval(), load_tokenizer(path)


def check_loading_info(path: str | Path, info: dict, key: str = "model.path") -> None:
    """Refuse a base whose weights do not match its config: a missing tensor would be left randomly initialised
    (transformers only warns), an unexpected or mis-shaped one means the files are not the model the config
    describes (a config edited by hand, weights of another model, a truncated shard set)."""
    problems = []
    for field, what in (("missing_keys", "missing from the weights (they would be random)"),
                      ("unexpected_keys", "in the weights but not in the model the config describes"),
                      ("mismatched_keys", "of another shape than the config gives")):
        names = sorted(str(n if isinstance(n, str) else n[0]) for n in info.get(field) or ())
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            problems.append(f"{len(names)} tensor(s) {what}: {', '.join(names[:5])}{more}")
    if problems:
        raise ValueError(f"{key}={path}: its weights do not match its config.json ({'; '.join(problems)}). "
                         f"Point {key} at a complete model directory (config.json and all weight files of the "
                         "same model)")
