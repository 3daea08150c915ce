"""(IA)³: the scaling math by hand, merge/unmerge, parameter counts, and PEFT interop in both directions."""

import json

import pytest
import torch
from peft import IA3Config as PeftIA3Config
from peft import PeftModel, get_peft_model

from align.adapters import AdapterError, AdapterModel, IA3Config, load_adapter, save_adapter
from align.models import tiny_gpt2, tiny_llama

from .helpers import INTEROP_ATOL, MIN_EFFECT, OneLinear, logits, max_diff, nudge, with_adapter

GPT2 = {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]}
CASES = {"llama": (tiny_llama, {}), "gpt2": (tiny_gpt2, GPT2)}


def one_linear_ia3(feedforward: bool, scale: list[float]) -> AdapterModel:
    model = AdapterModel(OneLinear(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1.0, -1.0])))
    model.add_adapter("a", IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if feedforward else None))
    vector = torch.tensor([scale]) if feedforward else torch.tensor(scale)[:, None]  # (1, in) or (out, 1)
    with torch.no_grad():
        model.layers_of("a")["proj"].adapters["a"].ia3_l.copy_(vector)
    model.set_active("a")
    return model


@pytest.mark.parametrize(("feedforward", "expected", "merged_weight", "merged_bias"), [
    # output: l ⊙ (W x + b) = [2, 0.5] ⊙ [4, 6] = [8, 3]; W' = diag(l) W, b' = l ⊙ b
    (False, [8.0, 3.0], [[2.0, 4.0], [1.5, 2.0]], [2.0, -0.5]),
    # input: W (l ⊙ x) + b = W [2, 0.5] + b = [3, 8] + [1, -1] = [4, 7]; W' = W diag(l), b unchanged
    (True, [4.0, 7.0], [[2.0, 1.0], [6.0, 2.0]], [1.0, -1.0]),
])
def test_ia3_scaling_and_merge_by_hand(feedforward, expected, merged_weight, merged_bias):
    """W = [[1, 2], [3, 4]], b = [1, -1], x = [1, 1] (W x + b = [4, 6]), l = [2, 0.5]."""
    model = one_linear_ia3(feedforward, [2.0, 0.5])
    x = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(model(x), torch.tensor([expected]))
    model.merge("a")
    base = model.model.proj.base_layer
    torch.testing.assert_close(base.weight.detach(), torch.tensor(merged_weight))
    torch.testing.assert_close(base.bias.detach(), torch.tensor(merged_bias))
    torch.testing.assert_close(model(x), torch.tensor([expected]))
    model.unmerge()
    torch.testing.assert_close(base.weight.detach(), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    torch.testing.assert_close(base.bias.detach(), torch.tensor([1.0, -1.0]))


def test_zero_scale_refuses_merge_before_touching_a_layer():
    model = one_linear_ia3(False, [0.0, 1.0])
    with pytest.raises(AdapterError, match="scale is exactly 0"):
        model.merge("a")
    assert model.merged_adapter is None
    torch.testing.assert_close(model.model.proj.base_layer.weight.detach(), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


@pytest.mark.parametrize("case", CASES)
def test_ia3_starts_as_the_identity_and_merges_back_exactly(case, input_ids):
    factory, cfg = CASES[case]
    base_logits = logits(factory(), input_ids)
    model = with_adapter(factory, IA3Config(**cfg), nudge_seed=None)
    assert torch.equal(logits(model, input_ids, "a"), base_logits)  # every vector starts at 1
    nudge(model.adapter_parameters("a"))
    adapted = logits(model, input_ids, "a")
    assert max_diff(adapted, base_logits) > MIN_EFFECT
    before = {k: v.clone() for k, v in model.model.state_dict().items() if ".adapters." not in k}
    model.merge("a")
    assert max_diff(logits(model, input_ids, "a"), adapted) < 1e-5  # measured 9e-8 (both models)
    model.unmerge()
    after = model.model.state_dict()
    # unmerge divides by the scales again: within fp32 rounding (measured 3.7e-9)
    assert max(max_diff(after[k], v) for k, v in before.items()) < 1e-6


def test_ia3_parameter_counts_by_hand():
    """tiny_llama: k, v output 16 each (2 kv heads x 8), down_proj input 64: 96 per layer, 192 in all.
    tiny_gpt2: c_attn output 3 x 32 = 96, mlp.c_proj input 4 x 32 = 128: 224 per layer, 448."""
    llama = with_adapter(tiny_llama, IA3Config(), nudge_seed=None)
    assert llama.parameter_report().trainable == 192
    shapes = {p.rsplit(".", 1)[-1]: tuple(m.ia3_l.shape) for p, m in
              ((p, layer.adapters["a"]) for p, layer in llama.layers_of("a").items())}
    assert shapes == {"k_proj": (16, 1), "v_proj": (16, 1), "down_proj": (1, 64)}
    gpt2 = with_adapter(tiny_gpt2, IA3Config(**GPT2), nudge_seed=None)
    assert gpt2.parameter_report().trainable == 448


def test_feedforward_modules_must_be_targets():
    with pytest.raises(AdapterError, match="subset of target_modules"):
        IA3Config(target_modules=["c_attn"])  # default feedforward_modules ('down_proj',) is not among them


# ------------------------------------------------------------------------------------------------ interop
@pytest.mark.parametrize("case", CASES)
def test_align_ia3_loads_in_peft(case, tmp_path, input_ids):
    factory, cfg = CASES[case]
    model = with_adapter(factory, IA3Config(**cfg))
    ours = logits(model, input_ids, "a")
    assert max_diff(ours, logits(factory(), input_ids)) > MIN_EFFECT
    save_adapter(model, "a", tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "IA3" and written["feedforward_modules"] == list(cfg.get("feedforward_modules",
                                                                                               ["down_proj"]))
    peft_model = PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
    assert max_diff(logits(peft_model, input_ids), ours) <= INTEROP_ATOL  # measured 0.0


@pytest.mark.parametrize("case", CASES)
def test_peft_ia3_loads_in_align(case, tmp_path, input_ids):
    factory, cfg = CASES[case]
    peft_cfg = cfg or {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    peft_model = get_peft_model(factory(), PeftIA3Config(init_ia3_weights=False, **peft_cfg)).eval()
    theirs = logits(peft_model, input_ids)
    assert max_diff(theirs, logits(factory(), input_ids)) > MIN_EFFECT
    peft_model.save_pretrained(tmp_path)
    model = AdapterModel(factory()).eval()
    config = load_adapter(model, tmp_path, "p")
    assert isinstance(config, IA3Config) and set(config.feedforward_modules) == set(peft_cfg["feedforward_modules"])
    assert max_diff(logits(model, input_ids, "p"), theirs) <= INTEROP_ATOL  # measured 0.0


def test_ia3_round_trip_is_bit_identical(tmp_path, input_ids):
    model = with_adapter(tiny_llama, IA3Config())
    save_adapter(model, "a", tmp_path)
    loaded = AdapterModel(tiny_llama()).eval()
    load_adapter(loaded, tmp_path, "b")
    assert torch.equal(logits(loaded, input_ids, "b"), logits(model, input_ids, "a"))


def test_ia3_on_a_bf16_base_keeps_fp32_vectors(input_ids):
    model = AdapterModel(tiny_llama().to(torch.bfloat16))
    model.add_adapter("a", IA3Config(init_ia3_weights=False))
    assert {p.dtype for p in model.adapter_parameters("a")} == {torch.float32}
    out = logits(model, input_ids, "a")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
