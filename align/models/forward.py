"""Forward passes the trainers share: final hidden states, response log-probs (chunked over the vocabulary, only at
response positions) and last-token pooling for scalar heads. Works on an ``AdapterModel`` or a plain causal LM."""

from __future__ import annotations

import torch
from torch import nn

from align.adapters import AdaptedLayer, AdapterModel
from align.algos import IGNORE_INDEX, chunked_token_logps


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside ``model``."""
    return model.model if isinstance(model, AdapterModel) else model


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final-layer hidden states (B, T, H) from the backbone (``base_model``), without computing logits."""
    backbone = causal_lm(model).base_model
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def response_token_logps(model: nn.Module, batch: dict[str, torch.Tensor],
                         chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of every response token given its prefix.

    batch: input_ids, attention_mask, response_mask (B, T), True = a response token whose log-prob counts.
    Returns (token_logps, mask), both (B, T - 1): position t scores token t + 1; zero where mask is False.
    Logits are computed only at response positions, chunked over the vocabulary (unchunked when the active
    adapter adapts the output head).
    """
    lm = causal_lm(model)
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
    mask = batch["response_mask"][:, 1:].bool()  # (B, T-1)
    selected = hidden[:, :-1][mask]  # (N, H): only the positions whose next token is a response token
    labels = batch["input_ids"][:, 1:][mask]  # (N,)
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if _head_adapter_runs(model, head):
        # an adapter on the output head is not a plain weight matrix: run the head itself, on the selected
        # positions only ((N, V) logits, never (B, T, V))
        logits = head(selected).float()  # (N, V)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        logps = torch.log_softmax(logits, dim=-1).gather(-1, labels[:, None]).squeeze(-1)  # (N,)
    else:
        logps = chunked_token_logps(selected[None], head.weight, labels[None], chunk_size,
                                    lm_head_bias=getattr(head, "bias", None), softcap=softcap)[0]  # (N,)
    token_logps = torch.zeros(mask.shape, dtype=logps.dtype, device=logps.device).masked_scatter(mask, logps)
    return token_logps, mask


def _head_adapter_runs(model: nn.Module, head: nn.Module) -> bool:
    """True when the active adapter of ``model`` adapts the output head (so ``head.weight`` alone is wrong)."""
    if not isinstance(model, AdapterModel) or not isinstance(head, AdaptedLayer):
        return False
    active = model.active_adapter
    return active is not None and active in head.adapters and head.merged != active


def last_token_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last real token (right padding): hidden (B, T, H) -> (B, H)."""
    last = attention_mask.long().sum(dim=1) - 1  # (B,)
    if (last < 0).any():
        raise ValueError("a row of the batch has no tokens")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def disable_dropout(model: nn.Module) -> None:
    """Switch off the base's dropout (nn.Dropout modules and attention-dropout rates), as preference and RL
    trainers need: the policy and its reference must be the same function at the start. Adapter dropout (inside
    ``.adapters.``) is left as configured."""
    for name, module in causal_lm(model).named_modules():
        if ".adapters." in f".{name}.":
            continue
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


__all__ = ["disable_dropout", "IGNORE_INDEX", "causal_lm", "hidden_states", "last_token_hidden", "response_token_logps"]
