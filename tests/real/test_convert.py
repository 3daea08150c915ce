"""The GGUF converter on the real SmolLM2 file (slow, real), and its command line's refusals (fast)."""

from __future__ import annotations

import json

import pytest
import torch

from align.convert import main


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main([]) == 2
    assert "exactly one of gguf=" in capsys.readouterr().err
    assert main([f"gguf={tmp_path / 'none.gguf'}"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["model=llama3"]) == 2
    assert "expected one of smollm2" in capsys.readouterr().err


def test_gguf_file_that_does_not_exist_is_refused_at_config_time(tmp_path):
    from align.config.compose import compose_run_config
    from align.config.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.gguf_file.*does not exist"):
        compose_run_config(["model=llama", f"model.path={tmp_path}", "model.gguf_file=missing.gguf"])


@pytest.mark.slow
@pytest.mark.real
def test_converted_smollm2_matches_the_gguf_loader(smollm2):
    """The converted directory gives transformers' own GGUF-loaded logits, has no quantization config left, keeps
    the tied embedding, the chat template, BOS/EOS and a pad token; 134,515,008 parameters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.models.convert import CONVERT_MARKER, load_gguf

    marker = json.loads((smollm2 / CONVERT_MARKER).read_text())
    gguf_model, gguf_tok = load_gguf(marker["gguf_file"])
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    tok = AutoTokenizer.from_pretrained(smollm2)
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 == marker["parameters"]
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tok.chat_template == gguf_tok.chat_template and "<|im_start|>" in tok.chat_template
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == ("<|im_end|>", "<|im_start|>", "<|im_end|>")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model.eval()(ids).logits)
