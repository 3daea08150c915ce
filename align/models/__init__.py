"""Base models: tiny factories for tests and the embedded default, and bitsandbytes quantization."""

from .quantize import quantize_linear_layers
from .tiny import tiny_gpt2, tiny_llama

__all__ = ["quantize_linear_layers", "tiny_gpt2", "tiny_llama"]
