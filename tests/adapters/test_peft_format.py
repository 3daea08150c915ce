"""PEFT-format save/load: align round trips, interop with the real ``peft`` both ways, the written config, base
fingerprint checks, refused inputs and several loaded adapters on one base.

Every adapter is made non-trivial (``init_lora_weights=False`` plus a seeded nudge of every adapter tensor, so DoRA
magnitudes and lora_only biases also differ from the base); each comparison first checks the adapter moves the
logits, so an adapter that silently did nothing could not pass.
"""

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from align.adapters import AdapterError, AdapterModel, BaseMismatchError, LoraConfig, base_fingerprint
from align.adapters.peft_format import load_adapter, save_adapter
from align.models.tiny import tiny_gpt2, tiny_llama

CASES = {
    "llama-lora": (tiny_llama, {}),
    "llama-rslora": (tiny_llama, {"use_rslora": True}),
    "llama-dora": (tiny_llama, {"use_dora": True}),
    "llama-qv": (tiny_llama, {"target_modules": ["q_proj", "v_proj"]}),
    "gpt2-lora": (tiny_gpt2, {}),
    "gpt2-rslora": (tiny_gpt2, {"use_rslora": True}),
    "gpt2-dora": (tiny_gpt2, {"use_dora": True}),
    "gpt2-bias": (tiny_gpt2, {"bias": "lora_only"}),
}
INTEROP_ATOL = 1e-5
MIN_EFFECT = 1e-2  # every adapter here moves some logit by more than this


def nudge(params, seed: int = 7) -> None:
    """Add seeded noise to every adapter tensor (LoRA A/B, DoRA magnitude, lora_only bias)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def align_model(factory, name="a", seed=0, nudge_seed=7, **cfg) -> AdapterModel:
    model = AdapterModel(factory(seed=seed)).eval()
    model.add_adapter(name, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **cfg))
    nudge(model.adapter_parameters(name), nudge_seed)
    return model


def logits(model, input_ids, name=None) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, AdapterModel):
            with model.use(name):
                return model(input_ids).logits
        return model(input_ids).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_moves_logits(adapted: torch.Tensor, factory, input_ids) -> None:
    assert max_diff(adapted, logits(factory(seed=0), input_ids)) > MIN_EFFECT


# ----------------------------------------------------------------------------------------- align -> align
@pytest.mark.parametrize("case", CASES)
def test_align_round_trip_is_bit_identical(case, tmp_path, input_ids):
    factory, cfg = CASES[case]
    saved = align_model(factory, **cfg)
    expected = logits(saved, input_ids, "a")
    assert_moves_logits(expected, factory, input_ids)
    save_adapter(saved, "a", tmp_path)

    loaded = AdapterModel(factory(seed=0)).eval()
    load_adapter(loaded, tmp_path, "b")
    want, got = saved.adapter_state_dict("a"), loaded.adapter_state_dict("b")
    assert want.keys() == got.keys() and len(want) > 0
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not any(p.requires_grad for p in loaded.adapter_parameters("b"))  # loaded frozen by default
    assert torch.equal(logits(loaded, input_ids, "b"), expected)


def test_adapter_loaded_into_eval_model_runs_without_dropout(tmp_path, input_ids):
    saved = align_model(tiny_llama, lora_dropout=0.5)
    expected = logits(saved, input_ids, "a")
    save_adapter(saved, "a", tmp_path)
    loaded = AdapterModel(tiny_llama(seed=0)).eval()
    load_adapter(loaded, tmp_path, "a")
    assert torch.equal(logits(loaded, input_ids, "a"), expected)


# ------------------------------------------------------------------------------------------ align -> PEFT
@pytest.mark.parametrize("case", CASES)
def test_align_adapter_loads_in_peft(case, tmp_path, input_ids):
    factory, cfg = CASES[case]
    model = align_model(factory, **cfg)
    ours = logits(model, input_ids, "a")
    assert_moves_logits(ours, factory, input_ids)
    save_adapter(model, "a", tmp_path)

    peft_model = PeftModel.from_pretrained(factory(seed=0), str(tmp_path)).eval()
    assert max_diff(logits(peft_model, input_ids), ours) <= INTEROP_ATOL


# ------------------------------------------------------------------------------------------ PEFT -> align
@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_align(case, tmp_path, input_ids):
    factory, cfg = CASES[case]
    cfg = {"target_modules": "all-linear", **cfg}
    peft_model = get_peft_model(factory(seed=0), PeftLoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **cfg))
    nudge([p for p in peft_model.parameters() if p.requires_grad])
    theirs = logits(peft_model.eval(), input_ids)
    assert_moves_logits(theirs, factory, input_ids)
    peft_model.save_pretrained(tmp_path)
    assert not (tmp_path / "align_base.json").exists()  # so the base check has nothing to compare

    model = AdapterModel(factory(seed=0)).eval()
    config = load_adapter(model, tmp_path, "p")
    assert (config.use_dora, config.use_rslora, config.bias) == (
        cfg.get("use_dora", False), cfg.get("use_rslora", False), cfg.get("bias", "none"))
    assert max_diff(logits(model, input_ids, "p"), theirs) <= INTEROP_ATOL


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_training_step_matches_peft(factory, dropout, tmp_path, input_ids):
    """Train mode, same weights, same RNG: the loss and every adapter gradient (A, B, DoRA magnitude) equal PEFT's,
    with dropout on (the dropped input feeds both DoRA terms) and off (align's single-product form)."""
    model = align_model(factory, use_dora=True, lora_dropout=dropout, target_modules="all-linear")
    save_adapter(model, "a", tmp_path)
    peft_model = PeftModel.from_pretrained(factory(seed=0), str(tmp_path), is_trainable=True)
    model.train()
    peft_model.train()
    model.set_active("a")
    model.unfreeze("a")

    def loss_and_grads(m, params):
        torch.manual_seed(3)
        out = m(input_ids).logits
        loss = (out.float() ** 2).mean()
        loss.backward()
        return loss.detach(), {k: v.grad for k, v in params.items()}

    ours = loss_and_grads(model, model.adapter_state_dict("a"))
    peft_params = {k.replace("base_model.model.", "").replace(".default", "")
                   .replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p
                   for k, p in peft_model.named_parameters() if p.requires_grad}
    theirs = loss_and_grads(peft_model, peft_params)
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) > 0
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    for key, grad in ours[1].items():
        assert grad is not None and grad.abs().max() > 0, key
        torch.testing.assert_close(grad, theirs[1][key], atol=1e-5, rtol=1e-4, msg=key)


# ------------------------------------------------------------------------------------- what is written
@pytest.mark.parametrize("factory, targets, conv1d", [
    (tiny_llama, ["q_proj", "v_proj"], False),
    (tiny_gpt2, ["c_attn", "c_fc"], True),
])
def test_written_config_has_the_keys_peft_reads(factory, targets, conv1d, tmp_path):
    model = align_model(factory, use_dora=True, use_rslora=True, target_modules=targets)
    save_adapter(model, "a", tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert (data["r"], data["lora_alpha"], data["use_dora"], data["use_rslora"]) == (4, 8, True, True)
    assert data["target_modules"] == targets
    assert data["fan_in_fan_out"] is conv1d
    peft_config = PeftLoraConfig.from_pretrained(str(tmp_path))  # PEFT's own parser accepts it
    assert (peft_config.r, peft_config.use_dora, peft_config.fan_in_fan_out) == (4, True, conv1d)

    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert all(k.startswith("base_model.model.") and ".a." not in k for k in keys)
    fingerprint = json.loads((tmp_path / "align_base.json").read_text())
    assert fingerprint == json.loads(json.dumps(base_fingerprint(factory(seed=0))))


# --------------------------------------------------------------------------------------- base checks
@pytest.fixture
def saved_llama(tmp_path):
    """An adapter saved on tiny_llama(seed=0) named 'tiny/llama-seed0'; returns (directory, the model that saved it)."""
    base = tiny_llama(seed=0)
    base.config.name_or_path = "tiny/llama-seed0"
    model = AdapterModel(base).eval()
    model.add_adapter("a", LoraConfig(r=4, init_lora_weights=False))
    save_adapter(model, "a", tmp_path / "adapter")
    return tmp_path / "adapter", model


@pytest.mark.parametrize("other, reasons", [
    (dict(seed=1), ["the weights differ"]),
    (dict(hidden_size=64), ["architecture config differs", "parameter shapes differ"]),
    (dict(num_layers=3), ["architecture config differs", "parameter shapes differ"]),
])
def test_wrong_base_is_refused_naming_the_wanted_base(saved_llama, other, reasons):
    directory, _ = saved_llama
    model = AdapterModel(tiny_llama(**other))
    with pytest.raises(BaseMismatchError) as err:
        load_adapter(model, directory, "a")
    message = str(err.value)
    assert "tiny/llama-seed0" in message and "check_base=False" in message
    assert all(r in message for r in reasons), message
    assert model.adapter_names == []


def test_weight_difference_is_caught_at_any_embedding_scale(tmp_path):
    """Embeddings 100x smaller than init (values ~2e-4): a fixed absolute tolerance would wave any seed through."""
    def small_embeddings(seed):
        base = tiny_llama(seed=seed)
        base.get_input_embeddings().weight.data.mul_(0.01)
        return AdapterModel(base)
    model = small_embeddings(0)
    model.add_adapter("a", LoraConfig(r=4))
    save_adapter(model, "a", tmp_path)
    with pytest.raises(BaseMismatchError, match="the weights differ"):
        load_adapter(small_embeddings(1), tmp_path, "a")
    load_adapter(small_embeddings(0), tmp_path, "a")  # the same base still loads


def test_check_base_false_loads_onto_a_different_base_of_the_same_shape(saved_llama):
    directory, saved = saved_llama
    model = AdapterModel(tiny_llama(seed=1))
    load_adapter(model, directory, "a", check_base=False)
    want, got = saved.adapter_state_dict("a"), model.adapter_state_dict("a")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_bf16_reload_of_the_same_base_is_accepted(saved_llama, tmp_path, input_ids):
    directory, saved = saved_llama
    bare = tiny_llama(seed=0)
    bare.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    model = AdapterModel(base).eval()
    load_adapter(model, directory, "a")
    # bf16 base, fp32 adapter: close to the fp32 result, far closer than the adapter's own effect
    expected = logits(saved, input_ids, "a")
    assert max_diff(logits(model, input_ids, "a"), expected) < 0.1 * max_diff(expected, logits(bare, input_ids))


# ------------------------------------------------------------------------------------- refused inputs
def test_pickled_weights_are_refused(saved_llama, tmp_path):
    directory, _ = saved_llama
    weights = load_file(str(directory / "adapter_model.safetensors"))
    (directory / "adapter_model.safetensors").unlink()
    torch.save(weights, directory / "adapter_model.bin")
    with pytest.raises(AdapterError, match="safetensors"):
        load_adapter(AdapterModel(tiny_llama()), directory, "a")


def test_missing_directory_or_config_is_a_clear_error(saved_llama, tmp_path):
    directory, _ = saved_llama
    with pytest.raises(AdapterError, match="nowhere.*not found"):
        load_adapter(AdapterModel(tiny_llama()), tmp_path / "nowhere", "a")
    (directory / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json not found"):
        load_adapter(AdapterModel(tiny_llama()), directory, "a")


def test_wrong_tensor_shape_names_the_layer_and_leaves_no_adapter(saved_llama, input_ids):
    directory, saved = saved_llama
    model = align_model(tiny_llama, name="keep")
    before = logits(model, input_ids, "keep")
    config_path = directory / "adapter_config.json"
    good = config_path.read_text()
    config_path.write_text(json.dumps({**json.loads(good), "r": 6}))
    with pytest.raises(AdapterError) as err:
        load_adapter(model, directory, "a")
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in str(err.value)
    assert "(4, 32)" in str(err.value) and "(6, 32)" in str(err.value)
    assert model.adapter_names == ["keep"]
    assert not any("a" in layer.adapters for layer in model.layers_of("keep").values())
    assert torch.equal(logits(model, input_ids, "keep"), before)

    config_path.write_text(good)  # the name is free again and a correct load works
    load_adapter(model, directory, "a")
    assert torch.equal(logits(model, input_ids, "a"), logits(saved, input_ids, "a"))


# --------------------------------------------------------------------------------- several adapters
def test_second_loaded_adapter_switches_with_the_first(tmp_path, input_ids):
    first = align_model(tiny_gpt2, nudge_seed=1)
    second = align_model(tiny_gpt2, nudge_seed=2, use_dora=True, target_modules=["c_attn"])
    save_adapter(first, "a", tmp_path / "first")
    save_adapter(second, "a", tmp_path / "second")
    want_first, want_second = logits(first, input_ids, "a"), logits(second, input_ids, "a")
    assert max_diff(want_first, want_second) > MIN_EFFECT

    model = AdapterModel(tiny_gpt2(seed=0)).eval()
    load_adapter(model, tmp_path / "first", "first")
    load_adapter(model, tmp_path / "second", "second")  # base check passes with wrappers already in place
    for name, want in [("first", want_first), ("second", want_second), ("first", want_first), (None, None)]:
        model.set_active(name)
        with torch.no_grad():
            got = model(input_ids).logits
        assert torch.equal(got, want if name else logits(tiny_gpt2(seed=0), input_ids))


def test_embedding_probe_reaches_the_last_entry_of_an_embedding_over_2_to_the_24():
    """A float32 linspace rounds n - 1 up to n past 2^24 entries (every real vocabulary: SmolLM2's 49,152 x 576 =
    28,311,552 raised IndexError at the first save). The probe's 16 positions are i * (n - 1) // 15 exactly."""
    from align.adapters.fingerprint import _embedding_probe

    vocab, hidden = 16_385, 1_024  # 16,778,240 entries > 2^24 = 16,777,216
    model = nn.Module()
    embed = nn.Embedding(vocab, hidden)
    with torch.no_grad():
        embed.weight.copy_(torch.arange(vocab * hidden, dtype=torch.float64).reshape(vocab, hidden).float())
    model.get_input_embeddings = lambda: embed
    probe = _embedding_probe(model)
    n = vocab * hidden
    assert len(probe) == 16
    assert probe[-1] == embed.weight[-1, -1].item() and probe[0] == 0.0
    assert probe == [embed.weight.reshape(-1)[i * (n - 1) // 15].item() for i in range(16)]
