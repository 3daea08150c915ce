"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning", section 2): P
trainable virtual-token embeddings E (P, H) placed before the input embeddings, [E; embed(x)] (B, P + T, H).

While the adapter is active the backbone sees P extra leading positions (attention mask lengthened with ones; the
virtual tokens take positions 0..P-1, as in PEFT) and its output is cut back to the real tokens, so hidden states,
logits, losses and cache-free helpers keep the input's length T: every role (LM, reward score, per-token value)
reads the positions it always reads. In generation the virtual tokens go in once, at the first forward; later steps
find them in the KV cache. Saved as PEFT's ``prompt_embeddings`` (P, H).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import prompt_learning as pl
from .errors import AdapterError
from .module import ModelAdapter
from .prompt_learning import PromptLearningConfig
from .registry import register_method

INIT_MODES = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass(frozen=True)
class PromptTuningConfig(PromptLearningConfig):
    """prompt_tuning_init: 'RANDOM' (N(0, 1), PEFT's default), 'SAMPLE_VOCAB' (embeddings of random vocabulary
    tokens) or 'TEXT' (embeddings of ``init_token_ids``, the tokens of ``prompt_tuning_init_text``, cut or repeated
    to P). The engine has no tokenizer: build TEXT configs with ``PromptTuningConfig.from_text``.
    tokenizer_name_or_path is recorded for PEFT, which requires it with TEXT."""

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    # align only, not written to adapter_config.json: the init text's token ids; () for a TEXT adapter read back
    # from a file, whose saved weights replace the start anyway
    init_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt_tuning_init not in INIT_MODES:
            raise AdapterError(f"prompt_tuning_init must be one of {INIT_MODES}, got {self.prompt_tuning_init!r}")
        if self.init_token_ids is not None:
            object.__setattr__(self, "init_token_ids", tuple(int(t) for t in self.init_token_ids))
        if self.prompt_tuning_init == "TEXT" and (self.init_token_ids is None or not self.prompt_tuning_init_text
                                                  or not self.tokenizer_name_or_path):
            raise AdapterError("prompt_tuning_init='TEXT' needs the text, its token ids and the tokenizer's name: "
                               "build the config with PromptTuningConfig.from_text(text, tokenizer)")

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> PromptTuningConfig:
        if data.get("prompt_tuning_init") == "TEXT":
            data = {**data, "init_token_ids": ()}
        return super().from_peft_dict(data, source)  # type: ignore[return-value]

    @classmethod
    def from_text(cls, text: str, tokenizer, num_virtual_tokens: int = 20, **kwargs) -> PromptTuningConfig:
        """A TEXT-initialised config: ``tokenizer(text)`` gives the token ids (any callable returning a mapping
        with ``input_ids``, e.g. a transformers tokenizer, whose ``name_or_path`` is recorded)."""
        ids = list(tokenizer(text)["input_ids"])
        if not ids:
            raise AdapterError(f"prompt_tuning_init_text {text!r} has no tokens")
        name = kwargs.pop("tokenizer_name_or_path", None) or getattr(tokenizer, "name_or_path", None)
        if not name:
            raise AdapterError("the tokenizer has no name_or_path; pass tokenizer_name_or_path= (PEFT records it)")
        return cls(num_virtual_tokens=num_virtual_tokens, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                   tokenizer_name_or_path=name, init_token_ids=tuple(ids), **kwargs)

    def to_peft_dict(self) -> dict[str, Any]:
        out = super().to_peft_dict()
        del out["init_token_ids"]
        return out


class PromptTuningModule(ModelAdapter):
    """The virtual-token embeddings (PEFT's prompt encoder ``embedding``)."""

    merge_refusal = ("prompt tuning adds learned tokens to the input sequence; no change of the base weights "
                     "reproduces that")

    def __init__(self, config: PromptTuningConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.num_virtual_tokens = config.num_virtual_tokens
        self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim, device=device, dtype=dtype)
        self._strip = 0  # virtual positions to cut from the output of the forward in flight

    @classmethod
    def build(cls, config: PromptTuningConfig, model: nn.Module, dtype: torch.dtype,
              path: str = "") -> PromptTuningModule:
        embed = model.get_input_embeddings()
        resolved = config.resolve(model, token_dim=int(embed.weight.shape[1]),
                                  num_attention_heads=pl.model_size(model, "num_attention_heads"))
        module = cls(resolved, embed.weight.device, dtype)
        ids = _init_token_ids(config, embed.num_embeddings, embed.weight.device)
        if ids is not None and embed.weight.device.type != "meta":
            with torch.no_grad():
                module.embedding.weight.copy_(embed(ids).to(dtype))
        return module

    def prepare(self, backbone: nn.Module, kwargs: dict) -> dict:
        batch, count = pl.batch_size_of(kwargs), self.num_virtual_tokens
        first = pl.cache_is_empty(kwargs.get("past_key_values"))
        pl.extend_attention_mask(kwargs, count, batch)
        pl.shift_position_ids(kwargs, count, prepend=first)
        self._strip = count if first else 0
        if first:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                embeds = backbone.get_input_embeddings()(kwargs["input_ids"])
            # the embedding's forward, not .weight: ZeRO-3 gathers a partitioned weight only for a forward
            prompts = self.embedding(torch.arange(count, device=self.embedding.weight.device))  # (P, H)
            prompts = prompts.to(embeds.dtype)[None].expand(batch, -1, -1)  # (B, P, H)
            kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)  # (B, P + T, H)
            kwargs["input_ids"] = None
        return kwargs

    def finish(self, output):
        count, self._strip = self._strip, 0
        if not count:
            return output
        if isinstance(output, tuple):
            return (output[0][:, count:], *output[1:])
        output.last_hidden_state = output.last_hidden_state[:, count:]  # (B, T, H)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, count:] for h in output.hidden_states)
        return output

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embedding.weight}


def _init_token_ids(config: PromptTuningConfig, vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """(P,) token ids whose embeddings start the prompt, or None for a random start."""
    count = config.num_virtual_tokens
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (count,), device=device)
    if config.prompt_tuning_init != "TEXT" or not config.init_token_ids:
        return None  # RANDOM, or TEXT read back from a file (the saved weights replace the start)
    ids = list(config.init_token_ids) * math.ceil(count / len(config.init_token_ids))  # repeat, then cut to P
    return torch.tensor(ids[:count], device=device)


register_method("PROMPT_TUNING", PromptTuningConfig, PromptTuningModule)
