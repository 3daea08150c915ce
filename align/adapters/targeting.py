"""Which layers of a model an adapter wraps: module-name lists, a regex, or 'all-linear'."""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from . import base_layers as bl
from .config import Targets
from .errors import AdapterError
from .layer import AdaptedLayer


def candidate_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) for every wrappable layer, already-wrapped ones included (yielded as their wrapper)."""
    skip: tuple[str, ...] = ()
    for path, module in model.named_modules():
        if skip and path.startswith(skip):
            continue
        if isinstance(module, AdaptedLayer):
            skip = (*skip, path + ".")
            yield path, module
        elif bl.is_supported(module):
            yield path, module


def _matches(path: str, targets: Targets) -> bool:
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: Targets, exclude: Targets = None) -> list[str]:
    """Paths of the layers an adapter with these targets wraps, in model order.

    'all-linear' takes every supported layer except the output head (``get_output_embeddings``), which would
    otherwise tie a huge vocab x hidden update to every adapter. A name that matches a layer kind the engine
    cannot wrap is an error, as is matching nothing.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for path, layer in candidate_layers(model):
        base = layer.base_layer if isinstance(layer, AdaptedLayer) else layer
        if targets == "all-linear":
            hit = base is not head and not path.endswith("lm_head")
        else:
            hit = _matches(path, targets)
        if hit and not _matches(path, exclude):
            found.append(path)
    if not found:
        if targets != "all-linear" and not isinstance(targets, str):
            _refuse_unsupported(model, targets)
        names = sorted({p.rsplit(".", 1)[-1] for p, _ in candidate_layers(model)})
        raise AdapterError(
            f"target_modules={targets!r} (exclude_modules={exclude!r}) matched no adaptable layer; "
            f"adaptable layer names in this model: {names}"
        )
    return found


def _refuse_unsupported(model: nn.Module, targets: tuple[str, ...]) -> None:
    for path, module in model.named_modules():
        if _matches(path, targets) and not bl.is_supported(module) and not isinstance(module, AdaptedLayer):
            raise AdapterError(
                f"target module {path!r} is a {type(module).__name__}; the engine wraps nn.Linear, GPT-2 Conv1D and "
                "bitsandbytes Linear4bit/Linear8bitLt layers"
            )
