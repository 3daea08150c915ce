"""The base-model fingerprint stamped beside every saved adapter (``align_base.json``).

An adapter is useless without the exact base it was trained on. The fingerprint records what identifies that base
and survives reloading it in another dtype or quantization: model type, a hash of the architecture config, a hash
of every layer's logical shape, and a probe of a few input-embedding values (embeddings are never quantized).
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
    return reasons
