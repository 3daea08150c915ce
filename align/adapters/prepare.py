"""Training preparation for adapters on large or quantized bases: gradient checkpointing and k-bit set-up."""

from __future__ import annotations

import torch
from torch import nn

from . import base_layers as bl


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass. Non-reentrant checkpointing lets gradients reach adapters even
    though the frozen base's inputs (the embeddings) do not require grad."""
    if not any(hasattr(model, name) for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable")):
        model = getattr(model, "model", model)  # an AdapterModel: its base
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 name; the old one warns and will go in v6
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False  # a KV cache is useless (and warned about) while checkpointing


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """Freeze the base, keep every non-quantized half-precision parameter (norms, embeddings, biases) in fp32 for
    stable training, make the embedding output require grad (for reentrant checkpointing users), and optionally
    turn on gradient checkpointing. Call on the base before wrapping it in ``AdapterModel``."""
    quantized_params = {id(p) for m in model.modules() if bl.is_quantized(m) for p in m.parameters(recurse=False)}
    for param in model.parameters():
        param.requires_grad_(False)
        if id(param) not in quantized_params and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model
