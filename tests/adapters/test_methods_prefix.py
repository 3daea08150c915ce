"""Prefix tuning / P-tuning v2: equal to the base run with the prefix in its KV cache, PEFT interop in both
directions (plain and reparametrised prefixes, grouped-query attention, GPT-2), generation, counts and refusals."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft import PrefixTuningConfig as PeftPrefixTuningConfig
from safetensors.torch import load_file
from transformers import DynamicCache

from align.adapters import (
    AdapterError,
    AdapterModel,
    PrefixTuningConfig,
    enable_gradient_checkpointing,
    load_adapter,
    save_adapter,
)
from align.models import tiny_gpt2, tiny_llama

from .helpers import INTEROP_ATOL, MIN_EFFECT, logits, max_diff, with_adapter

P = 3
FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def test_prefix_is_the_base_with_a_filled_cache(input_ids):
    """Reference built by hand: tiny_llama has 2 kv heads of 8 (D = 16) in 2 layers; the prefix (P, 2 * 2 * 16)
    splits per virtual token into [layer 0 keys, layer 0 values, layer 1 keys, layer 1 values] of 2 x 8 each."""
    model = with_adapter(tiny_llama, PrefixTuningConfig(num_virtual_tokens=P))
    mask = torch.ones_like(input_ids)
    mask[1, -4:] = 0
    ours = logits(model, input_ids, "a", attention_mask=mask)
    prefix = model.model_adapter("a").prefix().detach()
    assert prefix.shape == (P, 2 * 2 * 16)
    cache = DynamicCache()
    for layer in range(2):
        for_layer = prefix.view(P, 4, 2, 8)[:, 2 * layer: 2 * layer + 2]  # (P, k/v, heads, 8)
        keys, values = (for_layer[:, i].transpose(0, 1)[None].expand(2, -1, -1, -1) for i in (0, 1))
        cache.update(keys, values, layer)
    with torch.no_grad(), model.disabled():
        full = model(input_ids, attention_mask=torch.cat([torch.ones(2, P, dtype=mask.dtype), mask], 1),
                     past_key_values=cache).logits
    assert torch.equal(ours, full)
    assert max_diff(ours, logits(tiny_llama(), input_ids, attention_mask=mask)) > MIN_EFFECT
    # position ids, when given, move up by P: the same as letting the model count from the cache
    positions = torch.arange(12)[None].expand(2, -1)
    torch.testing.assert_close(logits(model, input_ids, "a", attention_mask=mask, position_ids=positions), ours)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "mlp"])
@pytest.mark.parametrize("name", FACTORIES)
def test_align_prefix_loads_in_peft(name, projection, tmp_path, input_ids):
    """A reparametrised prefix is saved as the MLP's output, with prefix_projection false."""
    factory = FACTORIES[name]
    model = with_adapter(factory, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection))
    ours = logits(model, input_ids, "a")
    save_adapter(model, "a", tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    width = {"llama": 2 * 2 * 16, "gpt2": 2 * 2 * 32}[name]  # GPT-2: 4 heads of 8, no grouped-query attention
    assert data["prefix_projection"] is False and data["token_dim"] * 2 * 2 == width
    assert load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"].shape == (P, width)
    peft_model = PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
    assert max_diff(logits(peft_model, input_ids), ours) <= INTEROP_ATOL  # measured 0.0

    again = AdapterModel(factory()).eval()
    load_adapter(again, tmp_path, "b")
    assert torch.equal(logits(again, input_ids, "b"), ours)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "mlp"])
@pytest.mark.parametrize("name", FACTORIES)
def test_peft_prefix_loads_in_align(name, projection, tmp_path, input_ids):
    factory = FACTORIES[name]
    cfg = PeftPrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection)
    peft_model = get_peft_model(factory(), cfg).eval()
    theirs = logits(peft_model, input_ids)
    peft_model.save_pretrained(tmp_path)
    model = AdapterModel(factory()).eval()
    config = load_adapter(model, tmp_path, "p")
    assert config.prefix_projection is False  # PEFT's file holds the computed prefix either way
    ours = logits(model, input_ids, "p")
    assert max_diff(ours, logits(factory(), input_ids)) > MIN_EFFECT
    # measured 0.0 (plain), 1.2e-7 (MLP: PEFT runs it, we load its saved output)
    assert max_diff(ours, theirs) <= INTEROP_ATOL


@pytest.mark.parametrize("name", FACTORIES)
def test_greedy_generation_equals_peft(name, tmp_path, input_ids):
    factory = FACTORIES[name]
    model = with_adapter(factory, PrefixTuningConfig(num_virtual_tokens=P), nudge_seed=None)
    save_adapter(model, "a", tmp_path)
    peft_model = PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    mask = torch.ones_like(input_ids)
    with torch.no_grad(), model.use("a"):
        ours = model.generate(input_ids=input_ids, attention_mask=mask, **settings)
    assert torch.equal(ours, peft_model.generate(input_ids=input_ids, attention_mask=mask, **settings))
    with torch.no_grad(), model.disabled():
        assert not torch.equal(model.generate(input_ids=input_ids, attention_mask=mask, **settings), ours)


def test_parameter_counts_by_hand():
    """Plain: P x L x 2 x D = 3 x 2 x 2 x 16 = 192. MLP (D_enc = D = 16): embedding 3 x 16 = 48, Linear(16, 16)
    272, Linear(16, 64) 1,088: 1,408; the saved prefix is still 192 values."""
    plain = with_adapter(tiny_llama, PrefixTuningConfig(num_virtual_tokens=P), nudge_seed=None)
    assert plain.parameter_report().trainable == 192
    mlp = with_adapter(tiny_llama, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True), nudge_seed=None)
    assert mlp.parameter_report().trainable == 1_408
    assert mlp.adapter_state_dict("a")["prompt_embeddings"].numel() == 192


def test_zero_init_is_a_zero_prefix():
    model = with_adapter(tiny_llama, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True,
                                                        init_weights="zero"), nudge_seed=None)
    assert torch.equal(model.model_adapter("a").prefix(), torch.zeros(P, 64))


def test_gradients_reach_the_prefix_and_checkpointing_is_refused(input_ids):
    model = with_adapter(tiny_llama, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True)).train()
    with model.use("a"):
        model(input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter_parameters("a"))
    enable_gradient_checkpointing(model)
    with pytest.raises(AdapterError, match="gradient checkpointing"), model.use("a"):
        model(input_ids, labels=input_ids)
    with torch.no_grad(), model.use("a"):
        model.eval()(input_ids)  # evaluation does not checkpoint: allowed


def test_merge_is_refused():
    model = with_adapter(tiny_llama, PrefixTuningConfig(num_virtual_tokens=P))
    with pytest.raises(AdapterError, match="cannot be merged.*key/value"):
        model.merge("a")
