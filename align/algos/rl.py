"""On-policy RL math for PPO, GRPO and RLOO: per-token KL estimators, masked whitening, GAE, the clipped policy
and value losses, entropy and critic-free group advantages. Stateful helpers (KL controllers, running reward
moments) live in ``control.py``.

Masks are (B, T) with True = a response token that counts; tensors are (B, T) unless stated. Losses reduce with a
token mean over every kept position of the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .logprobs import masked_mean, masked_sum

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from log-probs of tokens sampled from the policy (Schulman 2020,
    "Approximating KL Divergence"). With r = ref_logp - logp:
    k1 = -r (unbiased, can be negative), k2 = r^2 / 2 (biased, low variance), k3 = exp(r) - 1 - r (unbiased, >= 0).
    Any shape in, the same shape out."""
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KL_ESTIMATORS)}")


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over all positions where ``mask`` is True: a scalar. Unbiased (n - 1) by default, as
    TRL's ``masked_var``; raises when fewer than two positions are kept (this syncs with the device)."""
    count = mask.sum()
    if unbiased and int(count) < 2:
        raise ValueError(f"an unbiased masked variance needs at least 2 kept positions, got {int(count)}")
    centred = values - masked_mean(values, mask)
    return masked_sum(centred.square(), mask, dim=None) / (count - 1 if unbiased else count.clamp(min=1))


Reduce = Callable[[torch.Tensor], torch.Tensor]


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           reduce: Reduce | None = None) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps), the mean and unbiased variance taken over kept positions only (one pair
    of statistics for the whole batch, as TRL's ``masked_whiten``). ``shift_mean=False`` adds the mean back (only
    rescales). Positions outside the mask come back as 0. values (B, T), mask (B, T); returns (B, T).

    ``reduce``: sums a small tensor over the ranks of a data-parallel run (an all-reduce); the statistics are then
    those of the global batch, every rank holding a slice of it: two passes, (count, sum) then the sum of squared
    deviations from the global mean."""
    if reduce is None:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    else:
        mean, var = global_masked_moments(values, mask, reduce)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0.0)


def global_masked_moments(values: torch.Tensor, mask: torch.Tensor, reduce: Reduce
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of the kept positions of a batch split over ranks (``reduce`` sums over them),
    in float64: count and sum first, then the squared deviations from the global mean."""
    kept = mask.bool()
    x = values.double()
    count, total = reduce(torch.stack([kept.sum().double(), x[kept].sum()])).unbind()
    if int(count) < 2:
        raise ValueError(f"an unbiased masked variance needs at least 2 kept positions, got {int(count)}")
    mean = total / count
    squares = reduce((x[kept] - mean).square().sum().reshape(1))[0]
    return mean.to(values.dtype), (squares / (count - 1)).to(values.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16).

    rewards, values, mask (B, T); returns (advantages, returns), both (B, T) and 0 outside the mask.
    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where a position outside the
    mask ends the episode: the last kept token before it bootstraps from 0 and nothing flows back across it, so
    padding after the response (or any gap) contributes nothing. returns = A + V (the value targets).
    Vectorised over B, one reverse pass over T. Pass detached values; the caller runs it under no_grad."""
    keep = mask.bool()
    rewards = torch.where(keep, rewards, 0.0)
    values = torch.where(keep, values, 0.0)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = torch.where(keep[:, t], delta + gamma * lam * next_advantage, 0.0)
        next_value = values[:, t]
        advantages.append(next_advantage)
    advantages = torch.stack(advantages[::-1], dim=1)  # T x (B,) -> (B, T)
    return advantages, advantages + values


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, eq. 7), negated for minimisation.

    logp, old_logp, advantages, mask (B, T); returns (loss, metrics): loss a scalar, the token mean over kept
    positions of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) with ratio = exp(logp - old_logp).
    Metrics (detached scalars): ``clipfrac``, the share of kept tokens where the clipped term is strictly the
    larger (at the boundary itself both terms are equal and the token is not counted); ``approx_kl``, the token mean
    of (logp - old_logp)^2 / 2 (the k2 estimator of KL(old || new), as TRL reports it)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                   "approx_kl": masked_mean(0.5 * log_ratio.square(), mask)}
    return loss, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss, as OpenAI baselines' PPO2 and TRL: 0.5 * token mean over kept positions of
    max((V - R)^2, (V_clip - R)^2) with V_clip = old_V + clip(V - old_V, -eps, eps).

    values, old_values, returns, mask (B, T); returns (loss, clipfrac), scalars; clipfrac (detached) is the share of
    kept tokens where the clipped error is strictly the larger."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > error).float(), mask)
    return loss, clipfrac


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over kept positions: 1 is a perfect critic, 0 one that predicts the
    mean, negative worse. values, returns, mask (B, T); returns a scalar."""
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, in fp32: H = -sum_v p_v log p_v, with 0 log 0 = 0 so -inf
    logits (masked tokens) are fine.

    logits (B, T, V); returns (B, T). With ``chunk_size``, rows (B*T) are processed that many at a time so the fp32
    temporaries stay (chunk_size, V) when logits are bf16."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    flat = logits.reshape(-1, logits.shape[-1])  # (B*T, V)
    step = max(flat.shape[0], 1) if chunk_size is None else chunk_size
    parts = []
    for start in range(0, flat.shape[0], step):
        logp = flat[start:start + step].float().log_softmax(dim=-1)
        finite_logp = torch.where(torch.isfinite(logp), logp, 0.0)  # 0 log 0 = 0, and no NaN gradient for -inf
        parts.append(-(logp.exp() * finite_logp).sum(-1))
    entropy = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return entropy.view(logits.shape[:-1])  # (B, T)


def _groups(rewards: torch.Tensor, group_size: int, minimum: int) -> torch.Tensor:
    if group_size < minimum or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N,) with N a multiple of group_size >= {minimum}; "
                         f"got shape {tuple(rewards.shape)} and group_size {group_size}")
    return rewards.view(-1, group_size)  # (prompts, k)


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024, arXiv:2402.03300, Sec. 4.1.2): A_i = (r_i - mean_g) /
    (std_g + eps) over the k = ``group_size`` samples of the same prompt, std unbiased (n - 1) as TRL. ``scale=False``
    keeps only the centring (Dr. GRPO, Liu et al. 2025). rewards (N,) with the k samples of a prompt adjacent
    (index = prompt * k + sample, as ``repeat_interleave`` lays them out); returns (N,)."""
    groups = _groups(rewards, group_size, minimum=2)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)  # (N,)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO advantages (Ahmadian et al. 2024, arXiv:2402.14740; Kool et al. 2019): A_i = r_i - mean_{j != i} r_j
    within each group of k = ``group_size`` samples of one prompt, laid out as in ``grpo_advantages``.
    rewards (N,); returns (N,)."""
    groups = _groups(rewards, group_size, minimum=2)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)  # (N,)
