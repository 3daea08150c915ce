"""The base-model fingerprint stamped beside every saved adapter (``align_base.json``).

An adapter is useless without the exact base it was trained on. The fingerprint records what identifies that base
and survives reloading it in another dtype or quantization: model type, a hash of the architecture config, a hash
of every layer's logical shape, a probe of a few input-embedding values (embeddings are never quantized), and
``weight_probes``: a few values of every weight tensor at fixed positions (quantized layers dequantized), with the
absolute maximum of their quantization block and row, so that a base whose weights were changed (another
fine-tune, an edited ``q_proj``) is told apart from the same base reloaded in bf16 or quantized to NF4/int8.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from . import base_layers as bl
from .layer import AdaptedLayer

FINGERPRINT_FILE = "align_base.json"
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config", "use_cache",
    "_attn_implementation", "_attn_implementation_autoset", "architectures", "output_attentions",
    "output_hidden_states", "return_dict", "_commit_hash",
}
_PROBE_SIZE = 16
_WEIGHT_SAMPLES = 8
_BLOCK = 64  # bitsandbytes' 4-bit block: values in one block share a scale


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _logical_shapes(model: nn.Module) -> list[tuple[str, list[int]]]:
    """(name, shape) of every base weight, with quantized and Conv1D weights reported as (out, in)."""
    shapes = []
    for path, module in model.named_modules():
        if isinstance(module, AdaptedLayer) or ".adapters." in f".{path}.":
            continue
        path = path.replace(".base_layer", "")
        if bl.is_supported(module):
            d_in, d_out = bl.features(module)
            shapes.append((f"{path}.weight", [d_out, d_in]))
            continue
        for key, param in module.named_parameters(recurse=False):
            shapes.append((f"{path}.{key}" if path else key, list(param.shape)))
    return sorted(shapes)


def _embedding_probe(model: nn.Module) -> list[float]:
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None or embed.weight.device.type == "meta":
        return []
    flat = embed.weight.detach().reshape(-1)
    # integer positions: a float32 linspace rounds n - 1 up to n once n passes 2^24 (every real vocabulary)
    idx = torch.arange(_PROBE_SIZE, dtype=torch.int64) * (flat.numel() - 1) // (_PROBE_SIZE - 1)
    return [float(v) for v in flat[idx].float()]  # full precision: embeddings may be tiny (~1e-4)


def _positions(n: int, k: int) -> torch.Tensor:
    """k spread positions in [0, n), integer arithmetic (exact past 2^24 entries)."""
    k = min(k, n)
    return torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1) if k > 1 else torch.zeros(1, dtype=torch.int64)


def _probe(weight: torch.Tensor, quantization: str | None) -> list:
    """[quantization, [[value, block absmax, row absmax], ...]] at fixed positions of the (out, in) weight."""
    flat = weight.detach().reshape(-1)
    row = weight.shape[-1] if weight.dim() > 1 else flat.numel()
    samples = []
    for i in _positions(flat.numel(), _WEIGHT_SAMPLES).tolist():
        block = flat[i - i % _BLOCK:i - i % _BLOCK + _BLOCK]
        line = flat[i - i % row:i - i % row + row]
        samples.append([float(flat[i]), float(block.abs().max()), float(line.abs().max())])
    return [quantization, samples]


def _weight_probes(model: nn.Module) -> dict[str, list]:
    """A probe of every base weight tensor, by the name it has in the bare base. Tensors whose values this
    process does not hold (meta, or partitioned away by DeepSpeed ZeRO-3) are left out."""
    probes: dict[str, list] = {}
    with torch.no_grad():
        for path, module in model.named_modules():
            if isinstance(module, AdaptedLayer) or ".adapters." in f".{path}.":
                continue
            name = path.replace(".base_layer", "")
            if bl.is_supported(module):
                weight = module.weight
                if weight.device.type == "meta" or weight.numel() == 0:
                    continue
                probes[f"{name}.weight"] = _probe(bl.dense_weight(module), bl.quantization_of(module))
                continue
            for key, param in module.named_parameters(recurse=False):
                if param.device.type != "meta" and param.numel() > 0:
                    probes[f"{name}.{key}" if name else key] = _probe(param, None)
    return probes


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Identify ``model`` (the base, with or without adapter wrappers)."""
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    quant = sorted({q for m in model.modules() if (q := bl.quantization_of(m))})
    return {
        "name_or_path": getattr(config, "_name_or_path", "") or "",
        "model_type": config_dict.get("model_type", type(model).__name__),
        "config_sha": _sha({k: v for k, v in config_dict.items() if k not in _VOLATILE_CONFIG_KEYS}),
        "shapes_sha": _sha(_logical_shapes(model)),
        "num_parameters": sum(shape_numel(s) for _, s in _logical_shapes(model)),
        "embedding_probe": _embedding_probe(model),
        "quantization": quant or None,
        "weight_probes": _weight_probes(model),
    }


def shape_numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable reasons the two bases differ; empty when they are the same base.
    Quantization and dtype are allowed to differ (a QLoRA adapter is meant to load on the full-precision base)."""
    reasons = []
    for key, what in (("model_type", "model type"), ("config_sha", "architecture config"),
                      ("shapes_sha", "parameter shapes")):
        if saved.get(key) != current.get(key):
            reasons.append(f"{what} differs ({saved.get(key)} vs {current.get(key)})")
    a, b = saved.get("embedding_probe") or [], current.get("embedding_probe") or []
    # Relative tolerance: a bf16/fp16 reload moves each value by < 0.2%, while another seed's embedding differs
    # at the scale of the values themselves, however small they are. The 1e-6 floor absorbs values stored
    # rounded to 6 decimals.
    if a and b and (len(a) != len(b) or any(abs(x - y) > 1e-2 * abs(x) + 1e-6 for x, y in zip(a, b))):
        reasons.append("the weights differ (embedding probe does not match)")
    changed = _changed_weights(saved.get("weight_probes") or {}, current.get("weight_probes") or {})
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        reasons.append(f"the weights differ ({', '.join(changed[:3])}{more} hold other values)")
    return reasons


def _changed_weights(saved: dict[str, list], current: dict[str, list]) -> list[str]:
    """Tensors (present in both probes) whose sampled values differ by more than a reload can explain: 1% of the
    value when neither side is quantized (bf16 rounds by < 0.4%), else the quantization error bound (NF4: under
    0.16 of the block's absolute maximum; int8: half a step of the row's 127, plus the same margin)."""
    changed = []
    for name in sorted(set(saved) & set(current)):
        (qa, a), (qb, b) = saved[name], current[name]
        if len(a) != len(b):
            changed.append(name)
            continue
        for (x, block_x, row_x), (y, block_y, row_y) in zip(a, b):
            if qa is None and qb is None:
                tol = 1e-2 * max(abs(x), abs(y)) + 1e-6
            else:
                tol = 0.2 * max(block_x, block_y) + max(row_x, row_y) / 127 + 1e-6
            if abs(x - y) > tol:
                changed.append(name)
                break
    return changed
