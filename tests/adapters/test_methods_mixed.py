"""Many named adapters of every method on one base: each switches in exactly as it runs alone, only the active one
gets gradients, merge rules hold across kinds, and the trainable counts of a Llama-2-7B-shaped model (the table in
docs/adapters.md)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from align.adapters import (
    PFEIFFER,
    AdaLoraConfig,
    AdapterError,
    AdapterModel,
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    load_adapter,
    save_adapter,
)
from align.models import tiny_llama

from .helpers import logits, max_diff, with_adapter

CONFIGS = {
    "lora": LoraConfig(r=4, init_lora_weights=False),
    "ia3": IA3Config(init_ia3_weights=False),
    "adalora": AdaLoraConfig(init_r=4, target_r=2, total_step=10, init_lora_weights=False),
    "bottleneck": BottleneckConfig(bottleneck_size=8, init_weights=False),
    "prompt": PromptTuningConfig(num_virtual_tokens=3),
    "prefix": PrefixTuningConfig(num_virtual_tokens=3),
}


@pytest.fixture
def alone(tmp_path, input_ids):
    """Each method's adapter saved from a model that holds only it, with its stand-alone logits."""
    out = {}
    for i, (name, config) in enumerate(CONFIGS.items()):
        model = with_adapter(tiny_llama, config, nudge_seed=i)
        save_adapter(model, "a", tmp_path / name)
        out[name] = logits(model, input_ids, "a")
    return out


def test_mixed_adapters_switch_like_they_run_alone(alone, tmp_path, input_ids):
    model = AdapterModel(tiny_llama()).eval()
    for name in CONFIGS:
        load_adapter(model, tmp_path / name, name)
    base = logits(tiny_llama(), input_ids)
    for name in [*CONFIGS, *reversed(CONFIGS), None]:  # every switch, both directions, then the bare base
        want = alone[name] if name else base
        assert torch.equal(logits(model, input_ids, name), want), name
    for a in CONFIGS:
        for b in CONFIGS:
            assert a == b or max_diff(alone[a], alone[b]) > 1e-3  # all different, so the check above means something


def test_only_the_active_adapter_gets_gradients(input_ids):
    model = AdapterModel(tiny_llama()).train()
    for name, config in CONFIGS.items():
        model.add_adapter(name, config)
    for active in CONFIGS:
        model.zero_grad(set_to_none=True)
        with model.use(active):
            model(input_ids, labels=input_ids).loss.backward()
        for name in CONFIGS:
            grads = [p.grad for p in model.adapter_parameters(name)]
            if name == active:
                assert any(g is not None and g.abs().sum() > 0 for g in grads), name
            else:
                assert all(g is None for g in grads), (active, name)
        assert all(p.grad is None for p in model.model.parameters() if not p.requires_grad)


def test_merge_rules_across_kinds(input_ids):
    model = AdapterModel(tiny_llama()).eval()
    for name in ("lora", "ia3", "prompt", "bottleneck"):
        model.add_adapter(name, CONFIGS[name])
    ia3 = logits(model, input_ids, "ia3")
    model.merge("ia3")
    with pytest.raises(AdapterError, match="merged into the base"):
        model.set_active("prompt")  # a model-level adapter cannot run on a merged base either
    assert max_diff(logits(model, input_ids, "ia3"), ia3) < 1e-5
    model.unmerge()
    for name in ("prompt", "bottleneck"):
        with pytest.raises(AdapterError, match="cannot be merged"):
            model.merge(name)
    plain = model.merge_and_unload("lora")
    assert not plain.base_model._forward_pre_hooks and not plain.base_model._forward_hooks  # no hook left behind
    assert plain(input_ids).logits.shape == (2, 12, 128)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_method_trains_on_a_4bit_base(name, input_ids):
    """NF4 base (QLoRA set-up): the fp32 adapter gets a gradient through the frozen 4-bit layers; merging a layer
    method still needs dequantize=True."""
    pytest.importorskip("bitsandbytes")
    from align.models import quantize_linear_layers

    model = AdapterModel(quantize_linear_layers(tiny_llama(), "nf4")).train()
    model.add_adapter(name, CONFIGS[name])
    with model.use(name):
        model(input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter_parameters(name))
    if name in ("lora", "ia3", "adalora"):
        with pytest.raises(AdapterError, match="dequantize"):
            model.merge(name)


# ------------------------------------------------------------------------------------------ 7B counts
LLAMA_7B_BASE = 6_738_415_616
TABLE_7B = {  # name: (config, trainable parameters, worked out in the test's docstring)
    "LoRA r=8 q,v": (LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), 4_194_304),
    "IA3 k,v,down": (IA3Config(), 614_400),
    "AdaLoRA r0=12 q,v": (AdaLoraConfig(init_r=12, total_step=1000, target_modules=["q_proj", "v_proj"]), 6_292_224),
    "bottleneck Houlsby b=64": (BottleneckConfig(bottleneck_size=64), 33_820_672),
    "bottleneck Pfeiffer b=64": (BottleneckConfig(bottleneck_size=64, target_modules=PFEIFFER), 16_910_336),
    "prompt tuning P=20": (PromptTuningConfig(num_virtual_tokens=20), 81_920),
    "prefix tuning P=20": (PrefixTuningConfig(num_virtual_tokens=20), 5_242_880),
    "prefix tuning P=20 + MLP": (PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True), 1_090_867_200),
}


@pytest.mark.parametrize("name", TABLE_7B)
def test_trainable_counts_on_a_7b_llama(name):
    """Llama-2-7B shapes on the meta device: H = 4096, MLP 11008, L = 32, 32 heads (no GQA); base 6,738,415,616.
    LoRA: 32 x 2 x 8 x (4096 + 4096). IA3: 32 x (4096 + 4096 + 11008) = 32 x 19,200. AdaLoRA: 64 matrices x
    (12 x 4096 + 4096 x 12 + 12) = 64 x 98,316. Bottleneck: per wrapped output 2 x 4096 x 64 + 64 + 4096 = 528,448,
    x 64 (Houlsby: o_proj and down_proj) or x 32 (Pfeiffer). Prompt: 20 x 4096. Prefix: 20 x 32 x 2 x 4096; with the
    MLP (D_enc = 4096): 20 x 4096 + (4096² + 4096) + (4096 x 262,144 + 262,144) = 1,090,867,200 while training,
    still 5,242,880 values saved."""
    config, expected = TABLE_7B[name]
    llama = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        base = LlamaForCausalLM(llama)
    model = AdapterModel(base)
    model.add_adapter("a", config)
    report = model.parameter_report()
    assert (report.trainable, report.total) == (expected, LLAMA_7B_BASE + expected)
