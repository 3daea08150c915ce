"""Bottleneck adapters: the math by hand, identity at init, the documented align format round trip, placements,
parameter counts and the refused merge."""

import json

import pytest
import torch
from safetensors.torch import load_file

from align.adapters import (
    GPT2_HOULSBY,
    PFEIFFER,
    AdapterError,
    AdapterModel,
    BottleneckConfig,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from align.models import tiny_gpt2, tiny_llama

from .helpers import MIN_EFFECT, OneLinear, logits, max_diff, with_adapter


def test_bottleneck_by_hand():
    """W = I (2 x 2), x = [1, -2] so h = W x = [1, -2]. b = 1: down = [[1, 1]] + 0.5 -> 1 - 2 + 0.5 = -0.5,
    ReLU -> 0: the adapter adds only b_up = [0.25, 0]. With down bias 3.5: 2.5, ReLU 2.5, up = [[2], [-1]]
    -> [5, -2.5] + b_up -> h' = h + s * (up + b_up) with s = 2: [1 + 2 * 5.25, -2 + 2 * -2.5] = [11.5, -7]."""
    model = AdapterModel(OneLinear(torch.eye(2)))
    model.add_adapter("a", BottleneckConfig(target_modules=["proj"], bottleneck_size=1, adapter_scaling=2.0))
    module = model.layers_of("a")["proj"].adapters["a"]
    x = torch.tensor([[1.0, -2.0]])
    with model.use("a"):
        torch.testing.assert_close(model(x), x)  # up-projection zero: the identity
        with torch.no_grad():
            module.adapter_down.weight.copy_(torch.tensor([[1.0, 1.0]]))
            module.adapter_down.bias.fill_(0.5)
            module.adapter_up.weight.copy_(torch.tensor([[2.0], [-1.0]]))
            module.adapter_up.bias.copy_(torch.tensor([0.25, 0.0]))
        torch.testing.assert_close(model(x), torch.tensor([[1.0 + 2 * 0.25, -2.0]]))
        with torch.no_grad():
            module.adapter_down.bias.fill_(3.5)
        torch.testing.assert_close(model(x), torch.tensor([[11.5, -7.0]]))


@pytest.mark.parametrize(("factory", "targets", "wrapped", "trainable"), [
    # Houlsby on Llama: o_proj and down_proj outputs (d = 32), b = 8: 2 x 32 x 8 + 8 + 32 = 552 each, x 2 x 2
    (tiny_llama, None, ["self_attn.o_proj", "mlp.down_proj"], 2_208),
    (tiny_llama, PFEIFFER, ["mlp.down_proj"], 1_104),
    (tiny_gpt2, GPT2_HOULSBY, ["attn.c_proj", "mlp.c_proj"], 2_208),  # GPT-2 Conv1D outputs are 32 wide too
])
def test_placements_and_parameter_counts(factory, targets, wrapped, trainable, input_ids):
    cfg = {"bottleneck_size": 8} | ({"target_modules": targets} if targets else {})
    model = with_adapter(factory, BottleneckConfig(**cfg), nudge_seed=None)
    paths = list(model.layers_of("a"))
    assert [p.split(".", 3)[-1] for p in paths[:len(wrapped)]] == wrapped and len(paths) == 2 * len(wrapped)
    assert model.parameter_report().trainable == trainable
    assert torch.equal(logits(model, input_ids, "a"), logits(factory(), input_ids))  # identity at init


def test_bottleneck_trains_and_only_it_gets_gradients(input_ids):
    model = AdapterModel(tiny_llama()).train()
    model.add_adapter("a", BottleneckConfig(bottleneck_size=8))
    model.add_adapter("b", BottleneckConfig(bottleneck_size=4))
    with model.use("a"):
        model(input_ids, labels=input_ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_adapter_parameters("a")}
    # the up-projection starts at zero, so the down-projection's gradient is zero at step 0: only up gets one
    assert all(g is not None and (g.abs().sum() > 0) == (".adapter_up." in n) for n, g in grads.items())
    assert all(p.grad is None for p in model.adapter_parameters("b"))


def test_align_format_round_trip(tmp_path, input_ids):
    model = with_adapter(tiny_gpt2, BottleneckConfig(target_modules=GPT2_HOULSBY, bottleneck_size=8,
                                                     non_linearity="gelu", adapter_scaling=0.5))
    expected = logits(model, input_ids, "a")
    assert max_diff(expected, logits(tiny_gpt2(), input_ids)) > MIN_EFFECT
    save_adapter(model, "a", tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "ALIGN_BOTTLENECK"
    assert (data["bottleneck_size"], data["non_linearity"], data["adapter_scaling"]) == (8, "gelu", 0.5)
    assert data["target_modules"] == list(GPT2_HOULSBY) and data["fan_in_fan_out"] is True
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys[:4] == [f"base_model.model.transformer.h.0.attn.c_proj.adapter_{p}" for p in
                        ("down.bias", "down.weight", "up.bias", "up.weight")]
    assert read_adapter_config(tmp_path) == model.configs["a"]

    loaded = AdapterModel(tiny_gpt2()).eval()
    load_adapter(loaded, tmp_path, "b")
    assert torch.equal(logits(loaded, input_ids, "b"), expected)


def test_merge_is_refused_with_the_reason(input_ids):
    model = with_adapter(tiny_llama, BottleneckConfig())
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with pytest.raises(AdapterError, match="cannot be merged.*non-linearity"):
        model.merge("a")
    assert model.merged_adapter is None
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())


def test_bad_settings_are_named():
    with pytest.raises(AdapterError, match="non_linearity must be one of"):
        BottleneckConfig(non_linearity="swish")
    with pytest.raises(AdapterError, match="bottleneck_size"):
        BottleneckConfig(bottleneck_size=0)

