"""Tiny causal LMs built from configs with seeded random weights: nothing is downloaded."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, vocab_size: int = 128, hidden_size: int = 32, intermediate_size: int = 64,
               num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2) -> LlamaForCausalLM:
    """A Llama-architecture model; hidden/intermediate sizes are multiples of 32 so 4-bit kernels accept them."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    with torch.random.fork_rng():  # seeded weights, the caller's RNG left untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def tiny_gpt2(seed: int = 0, vocab_size: int = 128, n_embd: int = 32, n_layer: int = 2,
              n_head: int = 4) -> GPT2LMHeadModel:
    """A GPT-2 model (its attention and MLP use transformers' ``Conv1D``, weight stored (in, out))."""
    config = GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=256,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval()
