"""A base whose weights do not match its config is refused (transformers only warns and initialises the missing
tensors at random)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align.data.synthetic import build_tokenizer
from align.models.loading import load_base
from align.models.tiny import tiny_llama


def _base(path: Path, layers: int = 2) -> Path:
    tokenizer = build_tokenizer()
    tiny_llama(vocab_size=len(tokenizer), num_layers=layers).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _set_layers(path: Path, layers: int) -> None:
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (path / "config.json").write_text(json.dumps(config))


def test_a_complete_base_loads(tmp_path):
    model, _ = load_base(_base(tmp_path))
    assert model.config.num_hidden_layers == 2 and not any(p.requires_grad for p in model.parameters())


def test_a_config_with_more_layers_than_the_weights_is_refused(tmp_path):
    """config.json says 3 layers, the weights hold 2: layer 2 would be randomly initialised."""
    _set_layers(_base(tmp_path), 3)
    with pytest.raises(ValueError) as error:
        load_base(tmp_path)
    message = str(error.value)
    assert message.startswith(f"model.path={tmp_path}: its weights do not match its config.json")
    assert "tensor(s) missing from the weights (they would be random): model.layers.2." in message
    assert "Point model.path at a complete model directory" in message


def test_weights_of_a_larger_model_are_refused(tmp_path):
    _set_layers(_base(tmp_path), 1)
    with pytest.raises(ValueError, match=r"in the weights but not in the model the config describes: "
                                         r"model\.layers\.1\."):
        load_base(tmp_path)


def test_a_tensor_of_another_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _base(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 32)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model.path={tmp_path}: its weights do not match its config.json "
                                         r"\(tensors of another shape than the config gives"):
        load_base(tmp_path)
