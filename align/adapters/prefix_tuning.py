"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning", section 4) / P-tuning v2 (Liu et al. 2022, section 3.2): P
trainable key/value vectors in every attention layer, which every real token attends to as if they were P earlier
tokens.

The prefix is a tensor (P, L * 2 * D), D = kv_heads * head_dim (PEFT's ``token_dim``; grouped-query attention
stores fewer key/value heads than query heads), laid out per virtual token as [layer 0 keys, layer 0 values, layer
1 keys, ...], each split into heads. Optionally it is produced by a reparametrising MLP, prefix = MLP(E) with E
(P, D) and MLP = Linear(D, D_enc) -> tanh -> Linear(D_enc, L * 2 * D), which steadies training (paper section
4.3); saving runs the MLP once and writes the prefix itself, so the file never contains the MLP (PEFT loads it as a
plain prefix; so does align).

While the adapter is active the prefix is put in the backbone's KV cache (a transformers ``DynamicCache``, created
when the caller passed none) before the first forward of a sequence, the attention mask gains P leading ones and
position ids, when given, move up by P. Hidden states keep the input's length. transformers is imported only here,
when a prefix runs on a transformers model (which has imported it already).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import prompt_learning as pl
from .errors import AdapterError
from .module import ModelAdapter
from .prompt_learning import PromptLearningConfig
from .registry import register_method


@dataclass(frozen=True)
class PrefixTuningConfig(PromptLearningConfig):
    """prefix_projection: learn the prefix through the MLP (D_enc = encoder_hidden_size, default D);
    init_weights: None (N(0, 1) prefix, PEFT's default) or 'zero' (a zero prefix; with the MLP, its last layer
    starts at zero)."""

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise AdapterError(f"init_weights must be None or 'zero', got {self.init_weights!r}")

    def to_peft_dict(self) -> dict[str, Any]:
        out = super().to_peft_dict()
        out["prefix_projection"] = False  # the file holds the prefix itself (see the module docstring)
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> PrefixTuningConfig:
        # PEFT's files always hold the computed prefix, whatever prefix_projection says: load it as a plain prefix
        return super().from_peft_dict({**data, "prefix_projection": False}, source)  # type: ignore[return-value]


class PrefixTuningModule(ModelAdapter):
    """The prefix (or its embedding and MLP) for every layer's keys and values."""

    merge_refusal = ("prefix tuning adds learned key/value positions to every attention layer; no change of the "
                     "base weights reproduces that")

    def __init__(self, config: PrefixTuningConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        width = config.num_layers * 2 * config.token_dim
        count = config.num_virtual_tokens
        self.transform = None
        if config.prefix_projection:
            hidden = config.encoder_hidden_size
            self.embedding = nn.Embedding(count, config.token_dim, device=device, dtype=dtype)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, hidden, device=device, dtype=dtype), nn.Tanh(),
                                           nn.Linear(hidden, width, device=device, dtype=dtype))
        else:
            self.embedding = nn.Embedding(count, width, device=device, dtype=dtype)
        if config.init_weights == "zero":
            last = self.transform[-1] if self.transform is not None else self.embedding
            for param in last.parameters():
                nn.init.zeros_(param)

    @classmethod
    def build(cls, config: PrefixTuningConfig, model: nn.Module, dtype: torch.dtype,
              path: str = "") -> PrefixTuningModule:
        heads = pl.model_size(model, "num_attention_heads")
        kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
        head_dim = getattr(model.config, "head_dim", None) or pl.model_size(model, "hidden_size") // heads
        resolved = config.resolve(model, token_dim=head_dim * kv_heads, num_attention_heads=kv_heads)
        if resolved.encoder_hidden_size is None:
            resolved = dataclasses.replace(resolved, encoder_hidden_size=resolved.token_dim)
        device = model.get_input_embeddings().weight.device
        return cls(resolved, device, dtype)

    def prefix(self) -> torch.Tensor:
        """(P, L * 2 * D): the prefix as saved. Read through the embedding's forward, not ``.weight``: ZeRO-3
        gathers a partitioned weight only for a forward."""
        ids = torch.arange(self.config.num_virtual_tokens, device=self.embedding.weight.device)
        rows = self.embedding(ids)
        return rows if self.transform is None else self.transform(rows)

    def prepare(self, backbone: nn.Module, kwargs: dict) -> dict:
        if backbone.training and any(getattr(m, "gradient_checkpointing", False) for m in backbone.modules()):
            raise AdapterError(
                "prefix tuning keeps its prefix in the KV cache, which transformers drops inside checkpointed layers "
                "while training; turn gradient checkpointing off, or use prompt tuning or a layer method"
            )
        batch, count = pl.batch_size_of(kwargs), self.config.num_virtual_tokens
        cache = kwargs.get("past_key_values")
        if pl.cache_is_empty(cache):
            kwargs["past_key_values"] = self._filled_cache(backbone, cache, batch)
        pl.extend_attention_mask(kwargs, count, batch)
        pl.shift_position_ids(kwargs, count, prepend=False)
        return kwargs

    def _filled_cache(self, backbone: nn.Module, cache, batch: int):
        if cache is None:
            from transformers.cache_utils import DynamicCache

            cache = DynamicCache(config=backbone.config)
        cfg = self.config
        dtype = backbone.get_input_embeddings().weight.dtype
        heads, head_dim = cfg.num_attention_heads, cfg.token_dim // cfg.num_attention_heads
        kv = self.prefix().to(dtype).view(cfg.num_virtual_tokens, cfg.num_layers * 2, heads, head_dim)
        kv = kv.permute(1, 2, 0, 3)  # (L * 2, heads, P, head_dim)
        for layer in range(cfg.num_layers):
            keys, values = (kv[2 * layer + i][None].expand(batch, -1, -1, -1) for i in (0, 1))  # (B, heads, P, hd)
            cache.update(keys, values, layer)
        return cache

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        # the parameter itself when there is no MLP: loading copies into these tensors
        return {"prompt_embeddings": self.embedding.weight if self.transform is None else self.prefix()}

    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        if self.transform is not None:
            raise AdapterError(f"{where}: a saved prefix cannot be loaded into its reparametrising MLP; load it with "
                               "prefix_projection=False (read_adapter_config does)")
        super().load_peft_state_dict(tensors, where)


register_method("PREFIX_TUNING", PrefixTuningConfig, PrefixTuningModule)
