"""Forward passes the trainers share: final hidden states, response log-probs (chunked over the vocabulary, only at
response positions) and last-token pooling for scalar heads. Works on an ``AdapterModel`` or a plain causal LM."""

from __future__ import annotations

import torch
from torch import nn

from align.adapters import AdaptedLayer, AdapterModel
from align.algos import (
    IGNORE_INDEX,
    chunked_token_logps,
    chunked_token_logps_and_entropy,
    entropy_from_logits,
)

from .device import device_of, to_device


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside ``model``."""
    return model.model if isinstance(model, AdapterModel) else model


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final-layer hidden states (B, T, H) from the backbone (``base_model``), without computing logits."""
    backbone = causal_lm(model).base_model
    device = device_of(backbone)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = position_ids.to(device) if position_ids is not None else None
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def response_token_logps(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 4096,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of every response token given its prefix.

    batch: input_ids, attention_mask, response_mask (B, T), True = a response token whose log-prob counts.
    Returns (token_logps, mask), both (B, T - 1): position t scores token t + 1; zero where mask is False.
    Logits are computed only at response positions, chunked over the vocabulary (unchunked when the active
    adapter adapts the output head), and divided by ``temperature`` (as sampling at that temperature does).
    """
    token_logps, mask, _ = _response_logps(model, batch, chunk_size, temperature, with_entropy=False)
    return token_logps, mask


def response_logps_and_entropy(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 4096,
                               temperature: float = 1.0,
                               rows_per_chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``response_token_logps`` plus the entropy of the (temperature-scaled) next-token distribution at the same
    positions, from the same forward: (token_logps, entropy, mask), all (B, T - 1). The entropy is a detached
    diagnostic. Without gradients (scoring a rollout) both come from one pass over the vocabulary slices; when the
    log-probs need gradients, the entropy is computed ``rows_per_chunk`` positions at a time so at most
    (rows_per_chunk, V) logits exist."""
    return _response_logps(model, batch, chunk_size, temperature, with_entropy=True, rows_per_chunk=rows_per_chunk)


def _response_logps(model, batch, chunk_size, temperature, with_entropy, rows_per_chunk=256):
    lm = causal_lm(model)
    batch = to_device(batch, device_of(lm))
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
    mask = batch["response_mask"][:, 1:].bool()  # (B, T-1)
    selected = hidden[:, :-1][mask]  # (N, H): only the positions whose next token is a response token
    labels = batch["input_ids"][:, 1:][mask]  # (N,)
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    head_adapter = _head_adapter_runs(model, head)
    bias = getattr(head, "bias", None)
    needs_grad = torch.is_grad_enabled() and (selected.requires_grad or head.weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if with_entropy and not head_adapter and not needs_grad:
        # scoring without gradients: log-probs and entropy from one pass over the vocabulary slices
        logps, entropy = chunked_token_logps_and_entropy(
            selected, head.weight, labels, chunk_size, lm_head_bias=bias, softcap=softcap,
            temperature=temperature)  # (N,), (N,)
        return _scatter(logps, mask), _scatter(entropy, mask), mask
    if head_adapter:
        # an adapter on the output head is not a plain weight matrix: run the head itself, on the selected
        # positions only ((N, V) logits, never (B, T, V))
        logits = _head_logits(head, selected, softcap, temperature)  # (N, V)
        logps = torch.log_softmax(logits, dim=-1).gather(-1, labels[:, None]).squeeze(-1)  # (N,)
    else:
        logps = chunked_token_logps(selected[None], head.weight, labels[None], chunk_size, lm_head_bias=bias,
                                    softcap=softcap, temperature=temperature)[0]  # (N,)
    token_logps = _scatter(logps, mask)
    if not with_entropy:
        return token_logps, mask, None
    with torch.no_grad():
        rows = selected.detach()
        parts = [entropy_from_logits(_head_logits(head, rows[i:i + rows_per_chunk], softcap, temperature))
                 for i in range(0, rows.shape[0], rows_per_chunk)]
        entropy = torch.cat(parts) if parts else logps.new_zeros(0)  # (N,)
    return token_logps, _scatter(entropy, mask), mask


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) values at the True positions of a (B, T) mask, zeros elsewhere."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


def _head_logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None, temperature: float) -> torch.Tensor:
    """fp32 logits (N, V) of the output head, soft-capped and divided by the temperature."""
    logits = head(hidden).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


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


__all__ = ["disable_dropout", "IGNORE_INDEX", "causal_lm", "hidden_states", "last_token_hidden",
           "response_logps_and_entropy", "response_token_logps"]
