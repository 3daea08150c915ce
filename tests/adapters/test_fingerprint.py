"""The base fingerprint tells a changed base from the same base reloaded: one edited ``q_proj`` is caught
(the embedding probe alone missed it), while bf16, NF4 and int8 reloads of the same weights pass."""

from __future__ import annotations

import pytest
import torch

from align.adapters import AdapterModel, BaseMismatchError, LoraConfig
from align.adapters.fingerprint import base_fingerprint, fingerprint_differences
from align.models import quantize_linear_layers, tiny_llama

Q = "model.layers.1.self_attn.q_proj.weight"
SIZES = {"hidden_size": 64, "intermediate_size": 128}


def _edit(model, change) -> torch.nn.Module:
    with torch.no_grad():
        weight = model.model.layers[1].self_attn.q_proj.weight
        weight.copy_(change(weight))
    return model


def _another_init(weight: torch.Tensor) -> torch.Tensor:
    return torch.randn(weight.shape, generator=torch.Generator().manual_seed(99)) * weight.std()


@pytest.mark.parametrize("change", [_another_init, lambda w: w * 1.05], ids=["reinitialised", "scaled-5%"])
def test_an_edited_q_proj_is_a_different_base(change):
    saved = base_fingerprint(tiny_llama(**SIZES))
    edited = base_fingerprint(_edit(tiny_llama(**SIZES), change))
    assert saved["embedding_probe"] == edited["embedding_probe"]  # what the old fingerprint compared
    reasons = fingerprint_differences(saved, edited)
    assert reasons == [f"the weights differ ({Q} hold other values)"]


@pytest.mark.parametrize("reload", ["bf16", "nf4", "int8"])
def test_the_same_base_reloaded_matches(reload):
    pytest.importorskip("bitsandbytes")
    saved = base_fingerprint(tiny_llama(**SIZES))
    model = tiny_llama(**SIZES)
    model = model.to(torch.bfloat16) if reload == "bf16" else quantize_linear_layers(model, reload)
    assert fingerprint_differences(saved, base_fingerprint(model)) == []


def test_an_edited_q_proj_is_caught_through_nf4():
    pytest.importorskip("bitsandbytes")
    saved = base_fingerprint(tiny_llama(**SIZES))
    edited = quantize_linear_layers(_edit(tiny_llama(**SIZES), _another_init), "nf4")
    assert fingerprint_differences(saved, base_fingerprint(edited)) == [f"the weights differ ({Q} hold other values)"]


def test_loading_an_adapter_onto_an_edited_base_is_refused(tmp_path):
    model = AdapterModel(tiny_llama(**SIZES))
    model.add_adapter("a", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.save_adapter("a", tmp_path / "a")
    other = AdapterModel(_edit(tiny_llama(**SIZES), lambda w: w * 1.05))
    with pytest.raises(BaseMismatchError, match=r"q_proj\.weight hold other values"):
        other.load_adapter(tmp_path / "a", "a")
    AdapterModel(tiny_llama(**SIZES)).load_adapter(tmp_path / "a", "a")  # the same base takes it
