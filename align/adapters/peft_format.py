"""Save and load adapters in PEFT's on-disk format.

A saved adapter is a directory with ``adapter_config.json`` (PEFT's keys, so ``PeftModel.from_pretrained``,
vLLM and transformers read it), ``adapter_model.safetensors`` (keys ``base_model.model.<layer path>.<suffix>``,
adapter name stripped, as PEFT writes them; a model-level adapter's own keys, e.g. PEFT's ``prompt_embeddings``)
and ``align_base.json``, the fingerprint of the base it belongs to.
Only safetensors are read: pickled ``adapter_model.bin`` files are refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import base_layers as bl
from .errors import AdapterError, BaseMismatchError
from .fingerprint import FINGERPRINT_FILE, base_fingerprint, fingerprint_differences
from .model import AdapterModel
from .registry import get_method

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def save_adapter(model: AdapterModel, name: str, directory: str | os.PathLike) -> Path:
    """Write adapter ``name`` to ``directory`` (created; files replaced atomically). Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model._check(name)
    config = model.configs[name]
    fingerprint = base_fingerprint(model.model)
    peft_config: dict[str, Any] = config.to_peft_dict()
    peft_config.update(base_model_name_or_path=fingerprint["name_or_path"] or None, inference_mode=True,
                       revision=None)
    layers = model.layers_of(name)
    if layers:
        peft_config["fan_in_fan_out"] = any(bl.is_conv1d(layer.base_layer) for layer in layers.values())
    prefix = "" if model.model_adapter(name) is not None else PREFIX  # PEFT writes prompt-learning keys bare
    tensors = {prefix + k: v.detach().contiguous().cpu().clone() for k, v in model.adapter_state_dict(name).items()}
    _atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(peft_config, indent=2)))
    _atomic_write(directory / FINGERPRINT_FILE, lambda p: Path(p).write_text(json.dumps(fingerprint, indent=2)))
    return directory


def read_adapter_config(directory: str | os.PathLike):
    """The typed config stored in ``directory/adapter_config.json``."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{path} not found: an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path} is not valid JSON ({err})") from None
    if "peft_type" not in data:
        raise AdapterError(f"{path} has no 'peft_type'; is this a PEFT adapter directory?")
    return get_method(data["peft_type"]).config_cls.from_peft_dict(data, source=str(path))


def load_adapter(model: AdapterModel, directory: str | os.PathLike, name: str, trainable: bool = False,
                 check_base: bool = True):
    """Add adapter ``name`` from a PEFT-format ``directory`` (saved by align or by PEFT).

    With ``check_base`` the saved base fingerprint (when there is one) must match ``model``'s base; otherwise a
    ``BaseMismatchError`` says which base the adapter wants. Loaded adapters are frozen unless ``trainable``.
    """
    directory = Path(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise AdapterError(
                f"{directory} holds a pickled adapter_model.bin; align loads safetensors only (pickle can run "
                "code). Convert it once in a trusted environment with safetensors.torch.save_file"
            )
        raise AdapterError(f"{weights_path} not found")
    config = read_adapter_config(directory)
    if check_base:
        _check_base(model, directory)
    tensors = load_file(str(weights_path))
    model.add_adapter(name, config, trainable=trainable)
    try:
        model_adapter = model.model_adapter(name)
        if model_adapter is not None:
            model_adapter.load_peft_state_dict(tensors, where=str(weights_path))
        else:
            _load_tensors(model, name, tensors, weights_path)
    except Exception:
        model.delete_adapter(name)  # leave the model as it was
        raise
    return config


def _check_base(model: AdapterModel, directory: Path) -> None:
    path = directory / FINGERPRINT_FILE
    if not path.is_file():
        return  # adapters saved by PEFT carry no fingerprint; nothing to compare against
    saved = json.loads(path.read_text())
    reasons = fingerprint_differences(saved, base_fingerprint(model.model))
    if reasons:
        raise BaseMismatchError(
            f"adapter {directory} was trained on base {saved.get('name_or_path') or '(unnamed)'} "
            f"({saved.get('model_type')}, {saved.get('num_parameters'):,} parameters, config {saved.get('config_sha')})"
            f" but this model differs: {'; '.join(reasons)}. Load the base it wants, or pass check_base=False "
            "if you know better"
        )


def _load_tensors(model: AdapterModel, name: str, tensors: dict[str, torch.Tensor], source: Path) -> None:
    layers = model.layers_of(name)
    per_layer: dict[str, dict[str, torch.Tensor]] = {path: {} for path in layers}
    unmatched = []
    for key, tensor in tensors.items():
        key = key.removeprefix(PREFIX).replace(".default.", ".")  # tolerate in-memory PEFT names
        path = _owning_layer(key, per_layer)
        if path is None:
            unmatched.append(key)
        else:
            per_layer[path][key[len(path) + 1:]] = tensor
    if unmatched:
        raise AdapterError(f"{source}: tensors for layers this model does not adapt: {unmatched[:5]}")
    for path, layer in layers.items():
        layer.adapters[name].load_peft_state_dict(per_layer[path], where=f"{source}:{path}")


def _owning_layer(key: str, layers: dict[str, Any]) -> str | None:
    best = None
    for path in layers:
        if key.startswith(path + ".") and (best is None or len(path) > len(best)):
            best = path
    return best


def _atomic_write(path: Path, write) -> None:
    from align.durable import write_durable

    write_durable(path, write)  # unique temporary name, fsynced, renamed into place
