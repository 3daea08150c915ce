"""AdaLoRA: the SVD-form update by hand, the budget schedule, the rank allocator step for step against PEFT's,
pruned ranks saved and loaded as PEFT does (both directions), merging and parameter counts."""

import json

import pytest
import torch
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from align.adapters import (
    AdaLoraAllocator,
    AdaLoraConfig,
    AdapterError,
    AdapterModel,
    LoraConfig,
    load_adapter,
    save_adapter,
)
from align.models import tiny_gpt2, tiny_llama

from .helpers import INTEROP_ATOL, MIN_EFFECT, OneLinear, logits, max_diff, with_adapter

SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "total_step": 8,
            "target_modules": ["q_proj", "v_proj"]}
LR = 0.05
CASES = {"llama": (tiny_llama, ["q_proj", "v_proj"]), "gpt2": (tiny_gpt2, ["c_attn", "c_fc"])}


def test_svd_update_by_hand():
    """W = I, r0 = 2, alpha = 2: scale s = 2 / (2 + 1e-5). P = I, Λ = [1, 0.5], Q = I: ΔW = s diag(1, 0.5), so
    x = [1, 1] gives y = [1 + s, 1 + 0.5 s]; at init Λ = 0 and y = x."""
    model = AdapterModel(OneLinear(torch.eye(2)))
    model.add_adapter("a", AdaLoraConfig(init_r=2, target_r=1, lora_alpha=2, total_step=10, target_modules=["proj"]))
    x = torch.tensor([[1.0, 1.0]])
    with model.use("a"):
        torch.testing.assert_close(model(x), x)
        module = model.layers_of("a")["proj"].adapters["a"]
        with torch.no_grad():
            module.lora_A.copy_(torch.eye(2))
            module.lora_B.copy_(torch.eye(2))
            module.lora_E.copy_(torch.tensor([[1.0], [0.5]]))
        s = 2 / (2 + 1e-5)
        expected = torch.tensor([[1 + s, 1 + 0.5 * s]])
        torch.testing.assert_close(model(x), expected)
    model.merge("a")
    merged = torch.tensor([[1 + s, 0], [0, 1 + s / 2]])
    torch.testing.assert_close(model.model.proj.base_layer.weight.detach(), merged)
    torch.testing.assert_close(model(x), expected)
    model.unmerge()
    torch.testing.assert_close(model.model.proj.base_layer.weight.detach(), torch.eye(2))


def test_budget_schedule_by_hand():
    """q, v in 2 layers at r0 = 4: b0 = 16, b_T = 2 x 4 = 8. T = 8, tinit = 1, tfinal = 2, so the budget falls over
    steps 2..6 as 8 + 8 (1 - (t - 1) / 5)³: t = 2: 8 + 8 x 0.512 = 12.1 -> 12; t = 3: 8 + 8 x 0.216 -> 9;
    t = 4: 8.51 -> 8; then 8."""
    model = with_adapter(tiny_llama, AdaLoraConfig(**SCHEDULE), nudge_seed=None)
    allocator = AdaLoraAllocator(model, "a")
    assert (allocator.init_budget, allocator.target_budget) == (16, 8)
    schedule = [allocator.budget_schedule(t) for t in range(1, 9)]
    assert schedule == [(16, False), (12, True), (9, True), (8, True), (8, True), (8, True), (8, True), (8, True)]


def test_allocator_matches_peft_step_for_step(tmp_path):
    """Same start (PEFT's init saved and loaded into align), same batch, SGD lr 0.5. Every step both allocators keep
    the same triplets; the final pruned adapters give PEFT's logits in either library."""
    batch = torch.randint(3, 128, (4, 10), generator=torch.Generator().manual_seed(3))
    # task_type CAUSAL_LM: PEFT's causal-LM wrapper is the one that adds the orthogonal term to the loss
    peft_cfg = PeftAdaLoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **SCHEDULE)
    peft_model = get_peft_model(tiny_llama(), peft_cfg).train()
    peft_model.save_pretrained(tmp_path / "init")
    ours = AdapterModel(tiny_llama()).train()
    load_adapter(ours, tmp_path / "init", "a", trainable=True)
    allocator = AdaLoraAllocator(ours, "a")
    peft_opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
    our_opt = torch.optim.SGD(ours.adapter_parameters("a"), lr=LR)
    patterns = []
    for step in range(1, 9):
        peft_model(input_ids=batch, labels=batch).loss.backward()  # PEFT adds the orthogonal term itself
        peft_opt.step()
        peft_model.base_model.update_and_allocate(step)
        peft_opt.zero_grad()
        with ours.use("a"):
            loss = ours(batch, labels=batch).loss + allocator.orthogonal_regularization()
        loss.backward()
        our_opt.step()
        allocator.update_and_allocate(step)
        our_opt.zero_grad()
        pattern = peft_model.peft_config["default"].rank_pattern or {}
        theirs = {k.replace(".default", ""): v for k, v in pattern.items()}
        assert (ours.configs["a"].rank_pattern or {}) == theirs, f"step {step}"
        patterns.append(sum(sum(m) for m in theirs.values()) if theirs else None)
    assert patterns == [None, 12, 9, 8, 8, 8, 8, 8]  # kept triplets = the budget of each step

    ids = batch[:2]
    peft_model.eval()
    ours.eval()
    reference = logits(peft_model, ids)
    assert max_diff(logits(ours, ids, "a"), reference) < 1e-5  # measured 0.0 after 8 steps
    assert max_diff(reference, logits(tiny_llama(), ids)) > MIN_EFFECT

    save_adapter(ours, "a", tmp_path / "ours")
    peft_model.save_pretrained(tmp_path / "peft")
    for directory in ("ours", "peft"):
        data = json.loads((tmp_path / directory / "adapter_config.json").read_text())
        assert data["rank_pattern"] == ours.configs["a"].rank_pattern
        tensors = load_file(str(tmp_path / directory / "adapter_model.safetensors"))
        kept = sum(data["rank_pattern"]["model.layers.0.self_attn.q_proj.lora_E"])
        assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A"].shape == (kept, 32)
        assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B"].shape == (32, kept)
        in_peft = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / directory)).eval()
        in_align = AdapterModel(tiny_llama()).eval()
        load_adapter(in_align, tmp_path / directory, "b")
        # pruned (rank 8) vs masked (rank 16) matmuls: measured 1.2e-7 for both files in both libraries
        assert max_diff(logits(in_peft, ids), reference) < 1e-5, directory
        assert max_diff(logits(in_align, ids, "b"), reference) < 1e-5, directory
        assert in_align.parameter_report().trainable == 0  # loaded frozen
        assert sum(m.lora_A.shape[0] for m in in_align.adapter_modules("b")) == 8  # the final budget


@pytest.mark.parametrize("case", CASES)
def test_unpruned_interop_both_ways(case, tmp_path, input_ids):
    factory, targets = CASES[case]
    model = with_adapter(factory, AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=targets,
                                                init_lora_weights=False))
    ours = logits(model, input_ids, "a")
    assert max_diff(ours, logits(factory(), input_ids)) > MIN_EFFECT
    save_adapter(model, "a", tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(factory(), str(tmp_path / "ours")).eval()
    assert max_diff(logits(peft_model, input_ids), ours) <= INTEROP_ATOL  # measured 0.0 (Llama), 6.7e-8 (GPT-2)

    peft_cfg = PeftAdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=targets, init_lora_weights=False)
    theirs_model = get_peft_model(factory(), peft_cfg).eval()
    theirs = logits(theirs_model, input_ids)
    theirs_model.save_pretrained(tmp_path / "peft")
    loaded = AdapterModel(factory()).eval()
    load_adapter(loaded, tmp_path / "peft", "p")
    assert max_diff(logits(loaded, input_ids, "p"), theirs) <= INTEROP_ATOL  # measured 0.0 (Llama), 6e-8 (GPT-2)


def test_copy_of_a_pruned_adapter_keeps_its_ranks(tmp_path, input_ids):
    model = with_adapter(tiny_llama, AdaLoraConfig(**SCHEDULE, init_lora_weights=False)).train()
    allocator = AdaLoraAllocator(model, "a")
    with model.use("a"):
        model(input_ids, labels=input_ids).loss.backward()
    allocator.update_and_allocate(2)  # budget 12 of 16
    model.copy_adapter("a", "copy", trainable=False)
    assert model.configs["copy"].rank_pattern == model.configs["a"].rank_pattern
    assert torch.equal(logits(model, input_ids, "copy"), logits(model, input_ids, "a"))
    save_adapter(model, "copy", tmp_path)
    loaded = AdapterModel(tiny_llama()).eval()
    load_adapter(loaded, tmp_path, "b")
    assert sum(m.lora_A.shape[0] for m in loaded.adapter_modules("b")) == 12
    # the pruned rank-12 matmuls round differently from the masked rank-16 ones: measured 1.8e-7
    assert max_diff(logits(loaded, input_ids, "b"), logits(model.eval(), input_ids, "a")) < 1e-6


def test_parameter_counts_by_hand():
    """tiny_llama, init_r = 4 on q (32 -> 32) and v (32 -> 16): q 4 x 32 + 32 x 4 + 4 = 260, v 4 x 32 + 16 x 4 + 4
    = 196, per layer 456, 912 in all."""
    model = with_adapter(tiny_llama, AdaLoraConfig(**SCHEDULE), nudge_seed=None)
    assert model.parameter_report().trainable == 912


def test_allocator_needs_gradients_and_an_adalora_adapter(input_ids, tmp_path):
    model = with_adapter(tiny_llama, AdaLoraConfig(**SCHEDULE), nudge_seed=None)
    with pytest.raises(AdapterError, match="after backward"):
        AdaLoraAllocator(model, "a").update_and_allocate(2)
    model.add_adapter("lora", LoraConfig(r=2))
    with pytest.raises(AdapterError, match="not an AdaLoRA adapter"):
        AdaLoraAllocator(model, "lora")
    unset = with_adapter(tiny_llama, AdaLoraConfig(target_modules=["q_proj"]), nudge_seed=None)  # total_step None
    with pytest.raises(AdapterError, match="total_step > 0"):
        AdaLoraAllocator(unset, "a")  # the training loops fill it in; a bare allocator needs it
    with pytest.raises(AdapterError, match="set it"):
        save_adapter(unset, "a", tmp_path)  # PEFT cannot load an AdaLoRA config without it
    with pytest.raises(AdapterError, match="total_step > 0"):
        AdaLoraConfig(total_step=0)
    with pytest.raises(AdapterError, match="no budgeting phase"):
        AdaLoraConfig(total_step=5, tinit=3, tfinal=2)
