"""What the engine needs to know about the layers it wraps.

Supported bases: ``nn.Linear``, transformers' GPT-2 ``Conv1D`` (weight stored (in, out)), and bitsandbytes
``Linear4bit`` / ``Linear8bitLt``. Detection is by class name so this module imports only torch; bitsandbytes is
imported lazily and only when a quantized layer is actually present.

All weights handed out here are in the (out_features, in_features) layout, whatever the storage.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import AdapterError


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: y = x @ W + b with W of shape (in, out)."""
    return "Conv1D" in _class_names(module) and hasattr(module, "nf")


def is_4bit(module: nn.Module) -> bool:
    return "Linear4bit" in _class_names(module)


def is_8bit(module: nn.Module) -> bool:
    return "Linear8bitLt" in _class_names(module)


def is_quantized(module: nn.Module) -> bool:
    return is_4bit(module) or is_8bit(module)


def is_supported(module: nn.Module) -> bool:
    """True for every base layer kind an adapter can wrap."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_quantized(module)


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported layer."""
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    if hasattr(module, "in_features"):
        return int(module.in_features), int(module.out_features)
    raise AdapterError(f"{type(module).__name__} is not a layer the adapter engine can wrap")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a floating tensor of shape (out, in); quantized weights are dequantized.

    The result is detached; for full-precision layers it shares storage with the parameter.
    """
    if is_4bit(module):
        import bitsandbytes.functional as bnbf

        unpack_4bit(module)
        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).detach()
    if is_8bit(module):
        cb = module.state.CB if module.state.CB is not None else module.weight.CB
        scb = module.state.SCB if module.state.SCB is not None else module.weight.SCB
        if cb is None:
            cb = module.weight.data
        if scb is None:
            raise AdapterError("8-bit layer has no scale statistics (SCB): quantize it before wrapping")
        return (cb.float() * scb.float().unsqueeze(1) / 127.0).detach()
    if is_conv1d(module):
        return module.weight.detach().t()
    return module.weight.detach()


def add_to_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """In place: W += delta, with delta in (out, in) layout. Full-precision layers only."""
    if is_quantized(module):
        raise AdapterError("cannot write into a quantized weight without rounding; dequantize the layer first")
    with torch.no_grad():
        target = module.weight.data
        target += (delta.t() if is_conv1d(module) else delta).to(target.dtype)


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """In place: W = weight, with weight in (out, in) layout. Full-precision layers only."""
    if is_quantized(module):
        raise AdapterError("cannot write into a quantized weight without rounding; dequantize the layer first")
    with torch.no_grad():
        module.weight.data.copy_(weight.t() if is_conv1d(module) else weight)


def dequantized_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A full-precision ``nn.Linear`` equal to a (possibly quantized) layer, in ``dtype``."""
    d_in, d_out = features(module)
    weight = dense_weight(module)
    linear = nn.Linear(d_in, d_out, bias=module.bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.to(dtype))
        if module.bias is not None:
            linear.bias.copy_(module.bias.detach().to(dtype))
    linear.requires_grad_(False)
    linear.train(module.training)
    return linear


def unpack_4bit(module: nn.Module) -> None:
    """Keep a bitsandbytes 4-bit layer on its autograd path, forever.

    On CPUs with AVX-512 bf16, bitsandbytes repacks a ``Linear4bit`` weight for an inference kernel the first time
    it runs in eval mode on an input that does not require grad (a rollout, a reference pass). After that every
    call goes through the inference kernel, which has no autograd: gradients to the input, and so to every adapter
    below the layer, are silently lost. We switch the repack off and undo one that already happened.
    """
    if not is_4bit(module):
        return
    module.support_avx512bf16_for_cpu = False
    quant_state = getattr(module.weight, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            module.weight.data, quant_state
        )
        module.quant_state = module.weight.quant_state


def quantization_of(module: nn.Module) -> str | None:
    """'nf4' / 'fp4' / 'int8' for quantized layers, None otherwise."""
    if is_4bit(module):
        quant_state = getattr(module.weight, "quant_state", None)
        return getattr(quant_state, "quant_type", None) or getattr(module.weight, "quant_type", "4bit")
    if is_8bit(module):
        return "int8"
    return None
