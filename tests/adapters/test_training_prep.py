"""Training preparation for adapters: gradient checkpointing and ``prepare_for_kbit_training`` (QLoRA set-up)."""

import pytest
import torch
from torch import nn

from align.adapters import AdapterModel, LoraConfig, enable_gradient_checkpointing, prepare_for_kbit_training
from align.adapters import base_layers as bl
from align.models import quantize_linear_layers, tiny_llama

LORA = LoraConfig(r=4, init_lora_weights=False)  # A and B both random, so every adapter weight gets a gradient


def base_model(quantization: str | None) -> nn.Module:
    base = tiny_llama()
    if quantization is not None:
        pytest.importorskip("bitsandbytes")
        quantize_linear_layers(base, quantization)
    return base


def with_adapter(base: nn.Module) -> AdapterModel:
    model = AdapterModel(base)
    torch.manual_seed(0)  # identical adapter weights in every model built here
    model.add_adapter("a", LORA)
    model.set_active("a")
    return model.train()


def adapter_grads(model: AdapterModel, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    return {name: p.grad for name, p in model.named_adapter_parameters("a")}


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(quantization, input_ids):
    """Checkpointing recomputes each decoder layer in the backward pass (so an adapter runs twice per step) and must
    not change a single gradient: measured max difference 0.0 for both bases; we allow 1e-6."""
    plain = with_adapter(base_model(quantization))
    checkpointed = with_adapter(base_model(quantization))
    enable_gradient_checkpointing(checkpointed)
    assert checkpointed.model.is_activation_checkpointing and not plain.model.is_activation_checkpointing
    assert checkpointed.config.use_cache is False

    calls_plain = count_calls(plain.layers_of("a")["model.layers.0.self_attn.q_proj"].adapters["a"])
    calls_checkpointed = count_calls(checkpointed.layers_of("a")["model.layers.0.self_attn.q_proj"].adapters["a"])
    expected = adapter_grads(plain, input_ids)
    grads = adapter_grads(checkpointed, input_ids)
    assert (calls_plain[0], calls_checkpointed[0]) == (1, 2)  # forward, then the recomputation

    assert grads.keys() == expected.keys() and len(grads) == 2 * 7 * 2  # layers x linears x (A, B)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=1e-6)


def test_prepare_for_kbit_training_on_a_bf16_4bit_base(input_ids):
    """QLoRA set-up: a bf16 model, its Linears quantized to NF4 (bf16 compute), then prepared. Everything that is
    not a 4-bit weight (embeddings, norms, the dense lm_head) becomes fp32, the 4-bit codes stay uint8, the base is
    frozen, checkpointing is on, and a LoRA adapter trains."""
    pytest.importorskip("bitsandbytes")
    base = quantize_linear_layers(tiny_llama().to(torch.bfloat16), "nf4", compute_dtype=torch.bfloat16)
    quantized = {id(m.weight) for m in base.modules() if bl.is_4bit(m)}
    others = {name: p for name, p in base.named_parameters() if id(p) not in quantized}
    assert {p.dtype for p in others.values()} == {torch.bfloat16}
    codes = {name: p.data.clone() for name, p in base.named_parameters() if id(p) in quantized}
    assert len(codes) == 14

    assert prepare_for_kbit_training(base) is base
    assert {name: p.dtype for name, p in base.named_parameters() if id(p) not in quantized} == {
        name: torch.float32 for name in others
    }
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"} <= set(others)
    for name, p in base.named_parameters():
        if id(p) in quantized:
            assert p.dtype == torch.uint8 and torch.equal(p.data, codes[name]), name
    assert not any(p.requires_grad for p in base.parameters())
    assert base.is_activation_checkpointing and base.config.use_cache is False

    model = with_adapter(base)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(4.86, abs=0.05)  # ~ln(128) = 4.852
    loss.backward()
    grads = {name: p.grad for name, p in model.named_adapter_parameters("a")}
    assert len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert grad is not None and grad.dtype == torch.float32, name
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    adapter_ids = {id(p) for p in model.adapter_parameters("a")}
    assert all(p.grad is None for p in base.parameters() if id(p) not in adapter_ids)
