"""Token and sequence log-probabilities, and masked reductions.

``chunked_token_logps`` goes from hidden states straight to the log-prob of each label token, one slice of the
vocabulary at a time, so the (B, T, V) logits never exist at once: forward and backward both hold at most a few
(B*T, chunk) fp32 tensors, plus the gradient of the lm_head weight when that weight is trainable.

Labels are already shifted: ``labels[b, t]`` is the token whose probability position ``t`` predicts. Positions whose
label equals ``ignore_index`` get log-prob 0 and no gradient.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
KEEP_LOGITS_BYTES = 256 * 2**20  # chunked_token_logps keeps the slice logits for backward up to this size


def token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Log-prob of each label under ``logits``, computed in fp32 (fp64 for fp64 logits).

    logits (B, T, V), labels (B, T) int; returns (B, T), 0 where ``labels == ignore_index``.
    log p(y) = z_y - logsumexp(z). Materialises fp32 logits: use ``chunked_token_logps`` for large V.
    """
    valid = labels != ignore_index
    logits = logits.to(_reduce_dtype(logits))
    picked = logits.gather(-1, labels.where(valid, 0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return torch.where(valid, picked - torch.logsumexp(logits, dim=-1), 0.0)


def chunked_token_logps(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    *,
    lm_head_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    keep_logits_bytes: int = KEEP_LOGITS_BYTES,
) -> torch.Tensor:
    """Log-prob of each label from hidden states, in slices of ``chunk_size`` vocabulary rows.

    hidden (B, T, H), lm_head_weight (V, H), labels (B, T) int, lm_head_bias (V,) or None; returns (B, T) in fp32
    (fp64 for fp64 inputs), 0 where ``labels == ignore_index``. The logits are
    z = softcap * tanh(u / softcap) / temperature with u = hidden @ W^T + b (softcap as Gemma 2's
    ``final_logit_softcapping``, no tanh when None; temperature as in sampling).

    log p(y) = z_y - logsumexp(z), the logsumexp taken per slice and then across slices (exact, no approximation).
    A custom autograd function computes the gradients slice by slice; gradients flow to hidden, weight and bias
    (only those that require grad) and match the full computation to rounding. When the fp32 logits of all slices
    take at most ``keep_logits_bytes`` (256 MiB by default: 2,048 positions of a 32k vocabulary), forward keeps them
    for backward, which then skips recomputing them (a third of the head's matmul work) and frees each slice once
    used; beyond that, backward recomputes each slice, so peak memory stays O(B*T*chunk_size) in both passes
    (``keep_logits_bytes=0`` always recomputes). Slice logits are computed in the input dtype (or the autocast
    dtype, which backward restores) and reduced in fp32.
    """
    _check_options(chunk_size, softcap, temperature)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (B*T, H)
    flat_labels = labels.reshape(-1)  # (B*T,)
    if not torch.is_grad_enabled():  # no backward will come: keep nothing
        keep_logits_bytes = 0
    logps = _ChunkedTokenLogps.apply(flat_hidden, lm_head_weight, lm_head_bias, flat_labels, chunk_size,
                                     softcap, temperature, ignore_index, keep_logits_bytes)
    return logps.view(labels.shape)  # (B, T)


@torch.no_grad()
def chunked_token_logps_and_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    *,
    lm_head_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunked_token_logps`` (without gradients) and the entropy of each position's next-token distribution, from
    one pass over the vocabulary slices (the logits are computed once for both).

    Per slice k: s_k = logsumexp(z_k) and e_k = sum_v softmax(z_k)_v z_v. Then lse = logsumexp_k(s_k) and
    H = lse - sum_k exp(s_k - lse) e_k (H = lse - E_p[z]; exact). Same shapes and dtypes as ``chunked_token_logps``;
    returns (logps, entropy), both (B, T), 0 where ``labels == ignore_index``."""
    _check_options(chunk_size, softcap, temperature)
    x = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    safe_labels = flat_labels.where(valid, 0)
    picked = torch.zeros(x.shape[0], dtype=_reduce_dtype(x), device=x.device)  # (N,)
    slice_lse, slice_mean = [], []
    for start in range(0, lm_head_weight.shape[0], chunk_size):
        end = min(start + chunk_size, lm_head_weight.shape[0])
        z = _slice_logits(x, lm_head_weight, lm_head_bias, start, end, softcap, temperature)  # (N, C)
        lse_k = torch.logsumexp(z, dim=-1)  # (N,)
        finite = torch.isfinite(lse_k)
        p = torch.exp(z - torch.where(finite, lse_k, 0.0).unsqueeze(1))  # softmax within the slice
        mean_k = (p * torch.where(torch.isfinite(z), z, 0.0)).sum(-1)  # E[z] within the slice; 0 log 0 = 0
        slice_lse.append(lse_k)
        slice_mean.append(torch.where(finite, mean_k, 0.0))
        picked = _pick_labels(picked, z, safe_labels, start, end)
    lses = torch.stack(slice_lse, dim=-1)  # (N, K)
    lse = torch.logsumexp(lses, dim=-1)  # (N,)
    weights = torch.exp(lses - lse.unsqueeze(1))  # each slice's share of the probability mass
    entropy = lse - (weights * torch.stack(slice_mean, dim=-1)).sum(-1)
    logps = torch.where(valid, picked - lse, 0.0)
    return logps.view(labels.shape), torch.where(valid, entropy, 0.0).view(labels.shape)


def _check_options(chunk_size: int, softcap: float | None, temperature: float) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def _pick_labels(picked: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """``picked`` (N,) with the label logit taken from slice z (N, C) of vocab rows [start, end) where it lies."""
    inside = (labels >= start) & (labels < end)
    local = (labels - start).clamp(0, end - start - 1)
    return torch.where(inside, z.gather(1, local.unsqueeze(1)).squeeze(1), picked)


def _reduce_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for half types, fp64 stays fp64 (so gradcheck can run)."""
    return torch.promote_types(t.dtype, torch.float32)


def _slice_logits(x, weight, bias, start, end, softcap, temperature):
    """Logits z (N, C), fp32 or fp64, of vocab rows [start, end)."""
    u = x @ weight[start:end].T  # (N, C) in the input dtype
    if bias is not None:
        u = u + bias[start:end]
    u = u.to(_reduce_dtype(u))
    if softcap is None:
        return u if temperature == 1.0 else u / temperature
    return torch.tanh(u / softcap) * (softcap / temperature)


def _dz_du(z, softcap, temperature):
    """dz/du from the logits themselves (so kept and recomputed slices give the same gradient, bit for bit): an
    (N, C) tensor with softcap, where z = c tanh(u / c) / T gives (1 - (z T / c)^2) / T; else the constant 1 / T
    as a float, None when T = 1."""
    if softcap is None:
        return None if temperature == 1.0 else 1.0 / temperature
    squashed = z * (temperature / softcap)
    return (1.0 - squashed.square()) / temperature


class _ChunkedTokenLogps(torch.autograd.Function):
    """Forward: per-slice logsumexp and label logit. Backward: each slice's logits (kept or recomputed),
    d logp / dz = onehot - softmax."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, chunk_size, softcap, temperature, ignore_index, keep_logits_bytes):
        valid = labels != ignore_index
        safe_labels = labels.where(valid, 0)
        reduce_dtype = _reduce_dtype(x)
        picked = torch.zeros(x.shape[0], dtype=reduce_dtype, device=x.device)  # (N,)
        logits_bytes = x.shape[0] * weight.shape[0] * torch.finfo(reduce_dtype).bits // 8
        keep = any(ctx.needs_input_grad[:3]) and logits_bytes <= keep_logits_bytes
        slice_lse, kept = [], []
        for start in range(0, weight.shape[0], chunk_size):
            end = min(start + chunk_size, weight.shape[0])
            z = _slice_logits(x, weight, bias, start, end, softcap, temperature)  # (N, C)
            slice_lse.append(torch.logsumexp(z, dim=-1))
            if keep:
                kept.append(z)
            picked = _pick_labels(picked, z, safe_labels, start, end)
        lse = torch.logsumexp(torch.stack(slice_lse, dim=-1), dim=-1)  # (N, n_slices) -> (N,)
        ctx.save_for_backward(x, weight, bias, safe_labels, valid, lse)
        ctx.kept = kept if keep else None  # intermediates (not inputs or outputs): backward-once, so kept on ctx
        ctx.options = (chunk_size, softcap, temperature)
        device = x.device.type  # backward recomputes the slices under the forward's autocast state
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return torch.where(valid, picked - lse, 0.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, bias, labels, valid, lse = ctx.saved_tensors
        device, autocast_on, autocast_dtype = ctx.autocast
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_on):
            grads = _slice_grads(x, weight, bias, labels, valid, lse, grad_out, need_x, need_w, need_b, *ctx.options,
                                 kept=ctx.kept)
        return (*grads, None, None, None, None, None, None)


def _slice_grads(x, weight, bias, labels, valid, lse, grad_out, need_x, need_w, need_b,
                 chunk_size, softcap, temperature, kept=None):
    """Gradients to x (N, H), weight (V, H) and bias (V,), each None when not needed; one vocab slice at a time.
    ``kept``: forward's slice logits, used (and released) instead of recomputing them; a slice already released
    (a second backward through a retained graph) is recomputed."""
    g = torch.where(valid, grad_out.to(lse.dtype), 0.0)  # (N,)
    grad_x = torch.zeros(x.shape, dtype=lse.dtype, device=x.device) if need_x else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b else None
    for start in range(0, weight.shape[0], chunk_size):
        end = min(start + chunk_size, weight.shape[0])
        index = start // chunk_size
        if kept is not None and kept[index] is not None:
            z, kept[index] = kept[index], None
        else:
            z = _slice_logits(x, weight, bias, start, end, softcap, temperature)
        dz_du = _dz_du(z, softcap, temperature)
        grad_z = torch.exp(z - lse.unsqueeze(1)).mul_(-g.unsqueeze(1))  # -g * softmax, (N, C)
        rows = torch.nonzero((labels >= start) & (labels < end)).squeeze(1)
        grad_z.index_put_((rows, labels[rows] - start), g[rows], accumulate=True)  # + g * onehot
        grad_u = grad_z if dz_du is None else grad_z.mul_(dz_du)
        grad_u_in = grad_u.to(x.dtype)
        if need_x:
            grad_x += grad_u_in @ weight[start:end]
        if need_w:
            grad_w[start:end] = grad_u_in.T @ x
        if need_b:
            grad_b[start:end] = grad_u.sum(0)
    return (grad_x.to(x.dtype) if need_x else None), grad_w, grad_b


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = -1) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is True (True = the position counts). Same shapes; reduces ``dim`` (None:
    everything). Masked-out positions are dropped with ``where``, so inf/NaN there cannot leak into the sum."""
    kept = torch.where(mask.bool(), values, 0.0)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is True, reducing ``dim`` (None: one mean over all kept
    positions, e.g. a token-level mean over the batch). A slice with no kept position gives 0, not NaN."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def sequence_logps(token_logps: torch.Tensor, response_mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sequence log-prob from token log-probs: token_logps (B, T), response_mask (B, T) True = response token;
    returns (B,): the sum over response tokens, or their mean when ``average`` (length-normalised, as IPO and
    SimPO use)."""
    if average:
        return masked_mean(token_logps, response_mask, dim=-1)
    return masked_sum(token_logps, response_mask, dim=-1)
