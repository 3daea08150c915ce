"""Device placement helpers: batches follow the model, 'auto' picks what this process sees."""

import pytest
import torch

from align.config.compose import compose_run_config
from align.config.errors import ConfigError
from align.models.device import device_of, resolve_device, to_device


def test_to_device_moves_every_tensor_and_keeps_the_rest():
    batch = {"ids": torch.ones(2, 3), "nested": [torch.zeros(1), ("x", torch.ones(1))], "n": 3}
    moved = to_device(batch, torch.device("meta"))
    assert moved["ids"].device.type == "meta" and moved["nested"][0].device.type == "meta"
    assert moved["nested"][1][0] == "x" and moved["nested"][1][1].device.type == "meta"
    assert moved["n"] == 3 and isinstance(moved["nested"], list) and isinstance(moved["nested"][1], tuple)


def test_device_of_skips_meta_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2, device="meta"), torch.nn.Linear(2, 2))
    assert device_of(model) == torch.device("cpu")
    assert device_of(torch.nn.ReLU()) == torch.device("cpu")


def test_resolve_device():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_model_device_is_validated_with_the_config():
    assert compose_run_config(["model.device=cuda:1"]).model.device == "cuda:1"
    with pytest.raises(ConfigError, match=r"model.device='gpu'.*auto, cpu, cuda or cuda:N"):
        compose_run_config(["model.device=gpu"])
