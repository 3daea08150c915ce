"""LoRA / rsLoRA / DoRA layers and the many-adapters-on-one-base rules, asserted with numbers."""

import math
import subprocess
import sys

import pytest
import torch

from align.adapters import AdapterError, AdapterModel, LoraConfig
from align.models import tiny_gpt2, tiny_llama

from .helpers import OneLinear


def _set_lora(model, name, a, b, magnitude=None):
    module = model.layers_of(name)["proj"].adapters[name]
    with torch.no_grad():
        module.lora_A.weight.copy_(a)
        module.lora_B.weight.copy_(b)
        if magnitude is not None:
            module.lora_magnitude_vector.copy_(magnitude)


# ------------------------------------------------------------------------------------------------ by hand
def test_lora_and_rslora_by_hand():
    """W = I, x = [1, 2], r = 4, alpha = 4, BA = [[1, 0], [0, 0]] (A picks x1, B writes it to y1).
    LoRA: s = alpha / r = 1 -> y = x + 1 * [1, 0] = [2, 2].  rsLoRA: s = alpha / sqrt(r) = 2 -> y = [3, 2]."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    x = torch.tensor([[1.0, 2.0]])
    for use_rslora, expected in ((False, [2.0, 2.0]), (True, [3.0, 2.0])):
        model = AdapterModel(OneLinear(torch.eye(2)))
        model.add_adapter("a", LoraConfig(r=4, lora_alpha=4, use_rslora=use_rslora, target_modules=["proj"]))
        _set_lora(model, "a", a, b)
        with model.use("a"):
            torch.testing.assert_close(model(x), torch.tensor([expected]))


def test_dora_by_hand():
    """W = [[3, 4], [0, 1]], r = 1, s = 1, A = [[1, 0]], B = [[0], [1]] -> BA = [[0, 0], [1, 0]].
    W + BA = [[3, 4], [1, 1]], row norms n = [5, sqrt 2]. With magnitude m = [10, 1]:
    W' = m / n * (W + BA) = [[6, 8], [1/sqrt2, 1/sqrt2]], so x = [1, 1] gives y = [14, sqrt 2] (+ bias [1, -1])."""
    weight, bias = torch.tensor([[3.0, 4.0], [0.0, 1.0]]), torch.tensor([1.0, -1.0])
    model = AdapterModel(OneLinear(weight, bias))
    model.add_adapter("d", LoraConfig(r=1, lora_alpha=1, use_dora=True, target_modules=["proj"]))
    module = model.layers_of("d")["proj"].adapters["d"]
    # at init B = 0, so the magnitude is ||W|| per output row: [5, 1], and DoRA equals the base
    torch.testing.assert_close(module.lora_magnitude_vector.detach(), torch.tensor([5.0, 1.0]))
    _set_lora(model, "d", torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0], [1.0]]), torch.tensor([10.0, 1.0]))
    x = torch.tensor([[1.0, 1.0]])
    expected = torch.tensor([[14.0 + 1.0, math.sqrt(2.0) - 1.0]])
    with model.use("d"):
        torch.testing.assert_close(model(x), expected)
    model.merge("d")  # the merged weight is W' itself
    torch.testing.assert_close(model.model.proj.base_layer.weight.detach(),
                               torch.tensor([[6.0, 8.0], [2 ** -0.5, 2 ** -0.5]]))
    torch.testing.assert_close(model(x), expected)
    model.unmerge()
    torch.testing.assert_close(model.model.proj.base_layer.weight.detach(), weight)


# ------------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_adapters_off_and_zero_init_equal_base(factory, input_ids):
    base_logits = factory()(input_ids).logits
    model = AdapterModel(factory())
    model.add_adapter("zero", LoraConfig(r=4))  # B = 0: starts as the identity
    model.add_adapter("rand", LoraConfig(r=4, init_lora_weights=False))
    with model.disabled():
        assert torch.equal(model(input_ids).logits, base_logits)
    with model.use("zero"):
        assert torch.equal(model(input_ids).logits, base_logits)
    with model.use("rand"):
        assert (model(input_ids).logits - base_logits).abs().max() > 1e-2


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge_round_trip(factory, use_dora, input_ids):
    model = AdapterModel(factory())
    weights_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    model.add_adapter("a", LoraConfig(r=4, bias="lora_only", use_dora=use_dora, init_lora_weights=False))
    with model.use("a"):
        adapted = model(input_ids).logits
    model.merge("a")
    assert model.active_adapter == "a"
    torch.testing.assert_close(model(input_ids).logits, adapted, atol=1e-5, rtol=0)
    model.unmerge()
    after = {k.replace(".base_layer", ""): v for k, v in model.model.state_dict().items() if ".adapters." not in k}
    for key, before in weights_before.items():
        torch.testing.assert_close(after[key], before, atol=2e-6, rtol=0)


def test_merged_model_refuses_other_roles(input_ids):
    model = AdapterModel(tiny_llama())
    model.add_adapter("a", LoraConfig(r=2))
    model.add_adapter("b", LoraConfig(r=2))
    model.merge("a")
    with pytest.raises(AdapterError, match="merged into the base"):
        model.set_active("b")
    with pytest.raises(AdapterError, match="merged into the base"):
        model.set_active(None)
    with pytest.raises(AdapterError, match="unmerge"):
        model.delete_adapter("a")
    model.unmerge()
    model.set_active("b")


def test_only_active_adapter_gets_gradients(input_ids):
    model = AdapterModel(tiny_llama()).train()
    model.add_adapter("a", LoraConfig(r=4, init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=4, init_lora_weights=False))
    with model.use("a"):
        logits_a = model(input_ids, labels=input_ids)
    logits_a.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter_parameters("a"))
    assert all(p.grad is None for p in model.adapter_parameters("b"))
    assert all(p.grad is None for p in model.model.parameters() if not p.requires_grad)
    with model.use("b"):
        logits_b = model(input_ids).logits
    assert (logits_b - logits_a.logits.detach()).abs().max() > 1e-2


def test_switching_never_changes_trainability(input_ids):
    model = AdapterModel(tiny_llama())
    model.add_adapter("policy", LoraConfig(r=4))
    model.add_adapter("reference", LoraConfig(r=4), trainable=False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for name in ("policy", None, "reference", "policy"):
        with model.use(name):
            model(input_ids)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(p.requires_grad for p in model.model.parameters() if "adapters" not in _name_of(model, p))
    assert all(p.requires_grad for p in model.adapter_parameters("policy"))
    assert not any(p.requires_grad for p in model.adapter_parameters("reference"))
    model.freeze("policy")
    assert not any(p.requires_grad for p in model.adapter_parameters("policy"))
    model.unfreeze("reference")
    assert all(p.requires_grad for p in model.adapter_parameters("reference"))


def _name_of(model, param):
    return next(n for n, p in model.named_parameters() if p is param)


def test_base_parameters_exist_once(input_ids):
    """Adding adapters wraps layers in place: no base tensor is copied."""
    base = tiny_llama()
    pointers = {p.data_ptr() for p in base.parameters()}
    model = AdapterModel(base)
    for name in ("sft", "policy", "reward", "value"):
        model.add_adapter(name, LoraConfig(r=2))
    base_params = [p for n, p in model.named_parameters() if ".adapters." not in n]
    assert {p.data_ptr() for p in base_params} == pointers
    assert len(base_params) == len(pointers)


def test_copy_adapter_is_independent(input_ids):
    model = AdapterModel(tiny_llama()).train()
    model.add_adapter("sft", LoraConfig(r=4, init_lora_weights=False), trainable=False)
    model.copy_adapter("sft", "policy")
    with model.use("sft"):
        sft_logits = model(input_ids).logits
    with model.use("policy"):
        torch.testing.assert_close(model(input_ids).logits, sft_logits, atol=0, rtol=0)
        opt = torch.optim.SGD(model.adapter_parameters("policy"), lr=0.1)
        model(input_ids, labels=input_ids).loss.backward()
        opt.step()
        assert (model(input_ids).logits - sft_logits).abs().max() > 1e-4
    with model.use("sft"):
        assert torch.equal(model(input_ids).logits, sft_logits)


def test_dropout_only_in_training(input_ids):
    model = AdapterModel(tiny_llama())
    model.add_adapter("a", LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False))
    with model.use("a"):
        model.eval()
        first, second = model(input_ids).logits, model(input_ids).logits
        assert torch.equal(first, second)
        model.train()
        assert (model(input_ids).logits - first).abs().max() > 1e-4


def test_adapter_dtype_is_enforced_on_bf16_base(input_ids):
    model = AdapterModel(tiny_llama().to(torch.bfloat16), adapter_dtype=torch.float32)
    model.add_adapter("a", LoraConfig(r=4, init_lora_weights=False, use_dora=True))
    assert {p.dtype for p in model.adapter_parameters("a")} == {torch.float32}
    with model.use("a"):
        out = model(input_ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------- targeting
@pytest.mark.parametrize(
    ("targets", "exclude", "expected"),
    [
        (["q_proj", "v_proj"], None, 4),                       # 2 names x 2 layers
        (r"model\.layers\.0\.self_attn\.(q|k)_proj", None, 2),  # regex: full match on the path
        ("all-linear", None, 14),                               # 7 linears x 2 layers, lm_head excluded
        ("all-linear", ["down_proj"], 12),
    ],
)
def test_targeting(targets, exclude, expected):
    model = AdapterModel(tiny_llama())
    model.add_adapter("a", LoraConfig(r=2, target_modules=targets, exclude_modules=exclude))
    paths = list(model.layers_of("a"))
    assert len(paths) == expected
    assert not any(p.endswith("lm_head") for p in paths)


def test_gpt2_conv1d_targets_and_trains(input_ids):
    model = AdapterModel(tiny_gpt2()).train()
    model.add_adapter("a", LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False))
    assert len(model.layers_of("a")) == 4
    opt = torch.optim.AdamW(model.adapter_parameters("a"), lr=1e-2)
    losses = []
    with model.use("a"):
        for _ in range(10):
            loss = model(input_ids, labels=input_ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.add_adapter("a", LoraConfig(target_modules=["nope"])), "matched no adaptable layer"),
        (lambda m: m.add_adapter("a", LoraConfig(target_modules=["embed_tokens"])), "is a Embedding"),
        (lambda m: m.add_adapter("a", LoraConfig(bias="all")), "shared frozen base"),
        (lambda m: m.add_adapter("a", LoraConfig(r=0)), "r must be a positive integer"),
        (lambda m: m.add_adapter("a.b", LoraConfig()), "without dots"),
        (lambda m: m.set_active("ghost"), "no adapter named 'ghost'"),
    ],
)
def test_clear_errors(call, message):
    model = AdapterModel(tiny_llama())
    with pytest.raises(AdapterError, match=message):
        call(model)


def test_duplicate_and_delete():
    model = AdapterModel(tiny_llama())
    model.add_adapter("a", LoraConfig(r=2))
    with pytest.raises(AdapterError, match="already exists"):
        model.add_adapter("a", LoraConfig(r=2))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.adapter_names == ["a", "b"]
    model.set_active("a")
    model.delete_adapter("a")
    assert model.adapter_names == ["b"] and model.active_adapter is None
    assert not any("adapters.a." in n for n, _ in model.named_parameters())


def test_engine_imports_only_torch():
    code = "import sys, align.adapters; print(sorted(m for m in ('transformers', 'bitsandbytes', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_merge_and_export_plain_transformers_model(factory, input_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AdapterModel(factory())
    model.add_adapter("other", LoraConfig(r=2, init_lora_weights=False))
    model.add_adapter("a", LoraConfig(r=4, use_dora=True, init_lora_weights=False))
    with model.use("a"):
        adapted = model(input_ids).logits
    plain = model.merge_and_unload("a")
    assert not any(isinstance(m, type(model.model)) and m is not plain for m in plain.modules())
    assert not any("adapters" in n or "base_layer" in n for n, _ in plain.named_parameters())
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(input_ids).logits, adapted, atol=1e-5, rtol=0)
