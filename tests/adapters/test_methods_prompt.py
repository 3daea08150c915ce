"""Prompt tuning: equal to the base run on [E; embed(x)], outputs cut back to the input's length, PEFT interop in
both directions (logits and greedy generation), initialisations, counts and refusals."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft import PromptTuningConfig as PeftPromptTuningConfig

from align.adapters import (
    AdapterError,
    AdapterModel,
    LoraConfig,
    PromptTuningConfig,
    load_adapter,
    save_adapter,
)
from align.models import tiny_gpt2, tiny_llama
from align.models.forward import hidden_states

from .helpers import INTEROP_ATOL, MIN_EFFECT, logits, max_diff, with_adapter

P = 3
FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def right_padded(input_ids):
    """The batch with row 1's last 4 tokens padded away (mask 0)."""
    mask = torch.ones_like(input_ids)
    mask[1, -4:] = 0
    return mask


@pytest.mark.parametrize("factory", FACTORIES.values(), ids=FACTORIES)
def test_prompt_tuning_is_the_base_on_prepended_embeddings(factory, input_ids):
    """Reference: the bare base on inputs_embeds = [E; embed(x)] with P ones before the mask, real positions only."""
    model = with_adapter(factory, PromptTuningConfig(num_virtual_tokens=P))
    mask = right_padded(input_ids)
    ours = logits(model, input_ids, "a", attention_mask=mask)
    prompts = model.model_adapter("a").embedding.weight.detach()[None].expand(2, -1, -1)  # (B, P, H)
    embeds = torch.cat([prompts, model.model.get_input_embeddings()(input_ids)], dim=1)  # (B, P + T, H)
    with torch.no_grad(), model.disabled():
        full = model(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, P, dtype=mask.dtype), mask], 1))
    assert ours.shape == (2, 12, 128)
    assert torch.equal(ours, full.logits[:, P:])
    assert max_diff(ours, logits(factory(), input_ids, attention_mask=mask)) > MIN_EFFECT


def test_hidden_states_and_loss_keep_the_input_length(input_ids):
    model = with_adapter(tiny_llama, PromptTuningConfig(num_virtual_tokens=P))
    mask = torch.ones_like(input_ids)
    with model.use("a"):
        hidden = hidden_states(model, input_ids, mask)
        out = model(input_ids, labels=input_ids, output_hidden_states=True)
    assert hidden.shape == (2, 12, 32)
    assert len(out.hidden_states) == 3 and all(h.shape == (2, 12, 32) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[-1], hidden)
    # the loss is the usual shifted NLL over the real tokens
    shifted = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out.loss, -shifted.mean())


# ------------------------------------------------------------------------------------------------- interop
@pytest.mark.parametrize("name", FACTORIES)
def test_align_prompt_loads_in_peft(name, tmp_path, input_ids):
    factory = FACTORIES[name]
    model = with_adapter(factory, PromptTuningConfig(num_virtual_tokens=P))
    mask = right_padded(input_ids)
    ours = logits(model, input_ids, "a", attention_mask=mask)
    save_adapter(model, "a", tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "PROMPT_TUNING" and "target_modules" not in data and data["token_dim"] == 32
    peft_model = PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
    theirs = logits(peft_model, input_ids, attention_mask=mask)  # PEFT keeps the virtual positions: (B, P + T, V)
    assert theirs.shape[1] == P + 12
    assert max_diff(theirs[:, P:], ours) <= INTEROP_ATOL  # measured 0.0


@pytest.mark.parametrize("name", FACTORIES)
def test_peft_prompt_loads_in_align(name, tmp_path, input_ids):
    factory = FACTORIES[name]
    peft_model = get_peft_model(factory(), PeftPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)).eval()
    theirs = logits(peft_model, input_ids)
    peft_model.save_pretrained(tmp_path)
    model = AdapterModel(factory()).eval()
    config = load_adapter(model, tmp_path, "p")
    assert (config.num_virtual_tokens, config.token_dim, config.num_layers) == (P, 32, 2)
    ours = logits(model, input_ids, "p")
    assert max_diff(ours, logits(factory(), input_ids)) > MIN_EFFECT
    assert max_diff(theirs[:, P:], ours) <= INTEROP_ATOL  # measured 0.0


@pytest.mark.parametrize("name", FACTORIES)
def test_greedy_generation_equals_peft(name, tmp_path, input_ids):
    """The virtual tokens go in at the first forward only; later steps find them in the KV cache."""
    factory = FACTORIES[name]
    model = with_adapter(factory, PromptTuningConfig(num_virtual_tokens=P), nudge_seed=None)
    save_adapter(model, "a", tmp_path)
    peft_model = PeftModel.from_pretrained(factory(), str(tmp_path)).eval()
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    mask = torch.ones_like(input_ids)
    with torch.no_grad(), model.use("a"):
        ours = model.generate(input_ids=input_ids, attention_mask=mask, **settings)
    theirs = peft_model.generate(input_ids=input_ids, attention_mask=mask, **settings)
    assert ours.shape == (2, 18)
    assert torch.equal(ours, theirs)
    with torch.no_grad(), model.disabled():
        bare = model.generate(input_ids=input_ids, attention_mask=mask, **settings)
    assert not torch.equal(bare, ours)  # the prompt changes what is generated


# ---------------------------------------------------------------------------------------- initialisation
class FakeTokenizer:
    name_or_path = "fake/tokenizer"

    def __call__(self, text):
        return {"input_ids": [10 + len(word) for word in text.split()]}


def test_text_init_repeats_the_text_embeddings(tmp_path):
    """'a bb ccc' -> ids [11, 12, 13]; P = 5 repeats them: [11, 12, 13, 11, 12]."""
    config = PromptTuningConfig.from_text("a bb ccc", FakeTokenizer(), num_virtual_tokens=5)
    assert config.init_token_ids == (11, 12, 13) and config.tokenizer_name_or_path == "fake/tokenizer"
    model = with_adapter(tiny_llama, config, nudge_seed=None)
    embed = model.model.get_input_embeddings().weight.detach()
    assert torch.equal(model.model_adapter("a").embedding.weight.detach(), embed[[11, 12, 13, 11, 12]])
    save_adapter(model, "a", tmp_path)
    assert PeftPromptTuningConfig.from_pretrained(str(tmp_path)).prompt_tuning_init == "TEXT"  # PEFT accepts it
    reread = AdapterModel(tiny_llama())
    assert load_adapter(reread, tmp_path, "b").init_token_ids == ()  # ids are init-only: not saved


def test_sample_vocab_init_uses_vocabulary_rows():
    model = with_adapter(tiny_llama, PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"),
                         nudge_seed=None)
    rows = model.model_adapter("a").embedding.weight.detach()
    vocab = model.model.get_input_embeddings().weight.detach()
    assert all(any(torch.equal(row, v) for v in vocab) for row in rows)


# ------------------------------------------------------------------------------------------------- rules
def test_counts_switching_and_gradients(input_ids):
    """P x H = 3 x 32 = 96 trainable values. Prompt and LoRA adapters share one base; only the active one runs."""
    model = AdapterModel(tiny_llama()).train()
    model.add_adapter("prompt", PromptTuningConfig(num_virtual_tokens=P))
    assert model.parameter_report().trainable == 96
    model.add_adapter("lora", LoraConfig(r=2, init_lora_weights=False))
    with model.use("prompt"):
        model(input_ids, labels=input_ids).loss.backward()
    assert model.model_adapter("prompt").embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.adapter_parameters("lora"))
    with model.use("lora"):
        assert model(input_ids).logits.shape == (2, 12, 128)
    model.delete_adapter("prompt")
    assert model._hooks == [] and not any(h for h in model.model.base_model._forward_pre_hooks.values())


def test_refusals():
    model = with_adapter(tiny_llama, PromptTuningConfig(num_virtual_tokens=P))
    with pytest.raises(AdapterError, match="cannot be merged.*input sequence"):
        model.merge("a")
    with pytest.raises(AdapterError, match="target_modules / exclude_modules do not apply"):
        PromptTuningConfig(target_modules=["q_proj"])
    with pytest.raises(AdapterError, match="from_text"):
        PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    other = AdapterModel(tiny_llama())
    with pytest.raises(AdapterError, match="token_dim=64 but the base model has 32"):
        other.add_adapter("x", PromptTuningConfig(token_dim=64))
    assert other.adapter_names == [] and other._hooks == []  # a failed add leaves no hook behind
    with pytest.raises(AdapterError, match="not a transformers model"):
        AdapterModel(torch.nn.Linear(2, 2)).add_adapter("x", PromptTuningConfig())
