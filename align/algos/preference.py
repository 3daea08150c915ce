"""Pairwise preference losses: Bradley-Terry for reward models and the DPO family for policies.

Every DPO-family loss has one signature, ``(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
ref_rejected_logps, beta, **options) -> (B,)``: inputs are (B,) sequence log-probs (``sequence_logps``), the output
is one loss per pair and the caller reduces. Options are keyword-only and differ per loss (``label_smoothing`` for
cdpo/robust, ``gamma`` for simpo); passing an option a loss does not take is a TypeError, not silently ignored.

Below, h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected) is the log-ratio difference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

DPOLoss = Callable[..., torch.Tensor]


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """Reward-model loss -log sigmoid(r_chosen - r_rejected - margin) per pair (Ouyang et al. 2022, eq. 1; the
    margin as in Llama 2, Touvron et al. 2023, eq. 2). Rewards (B,), margin (B,), a float or None; returns (B,)."""
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference)


def _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def dpo_sigmoid_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                     ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO: -log sigmoid(beta * h) per pair (Rafailov et al. 2023, arXiv:2305.18290, eq. 7). Inputs (B,), output
    (B,)."""
    h = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * h)


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO: (h - 1 / (2 beta))^2 per pair, beta being the paper's tau (Azar et al. 2023, arXiv:2310.12036, eq. 17).
    Inputs (B,), output (B,).

    Pass length-averaged log-probs (``sequence_logps(..., average=True)``): with token sums the square grows with
    response length. The paper does not say so, but its results used the average (confirmed by the authors to TRL,
    which does the same)."""
    h = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (h - 1.0 / (2.0 * beta)).square()


def hinge_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC hinge: relu(1 - beta * h) per pair. Inputs (B,), output (B,).

    The rank-calibration loss of SLiC-HF (Zhao et al. 2023, arXiv:2305.10425), max(0, delta - log-prob gap),
    written on the reference-relative log-ratio h as in the DPO paper's and TRL's hinge variant; delta = 1 / beta."""
    h = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.relu(1.0 - beta * h)


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def cdpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float, *,
              label_smoothing: float = 0.0) -> torch.Tensor:
    """Conservative DPO: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), eps = ``label_smoothing`` the
    assumed chance that a label is flipped (Mitchell 2023, "A note on DPO with noisy preferences"). DPO's loss
    against soft targets; it is minimised at a finite h, so it does not push h to infinity. Inputs (B,), output
    (B,); eps = 0 is DPO."""
    _check_label_smoothing(label_smoothing)
    h = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def robust_dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float, *,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO: [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps), eps =
    ``label_smoothing`` the flip rate (Chowdhury et al. 2024, arXiv:2403.00409). Unlike cDPO this is an unbiased
    estimate of the clean-label DPO loss under flips with rate eps (it can be negative). Inputs (B,), output (B,);
    eps = 0 is DPO."""
    _check_label_smoothing(label_smoothing)
    h = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    clean = -(1.0 - label_smoothing) * F.logsigmoid(beta * h)
    flipped = label_smoothing * F.logsigmoid(-beta * h)
    return (clean + flipped) / (1.0 - 2.0 * label_smoothing)


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, beta: float, *,
               gamma: float = 0.5) -> torch.Tensor:
    """SimPO: -log sigmoid(beta * (policy_chosen - policy_rejected) - gamma) per pair (Meng et al. 2024,
    arXiv:2405.14734, eq. 6). Reference-free: the ref arguments are ignored (may be None). Pass length-averaged
    policy log-probs (``sequence_logps(..., average=True)``): the paper's reward is beta / |y| * log pi(y|x).
    ``gamma`` is the target reward margin itself (TRL's ``simpo_gamma``), not gamma / beta. Inputs (B,), output
    (B,)."""
    return -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps) - gamma)


DPO_LOSSES: dict[str, DPOLoss] = {
    "sigmoid": dpo_sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "cdpo": cdpo_loss,
    "robust": robust_dpo_loss,
    "simpo": simpo_loss,
}


def get_dpo_loss(name: str) -> DPOLoss:
    """The DPO-family loss called ``name``; an unknown name raises a ValueError listing the valid ones."""
    try:
        return DPO_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown DPO loss {name!r}; valid names: {', '.join(sorted(DPO_LOSSES))}") from None


def dpo_implicit_rewards(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                         ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                         beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards beta * (policy - ref) for chosen and rejected (Rafailov et al. 2023, eq. 5 up to the
    partition term, which cancels in margins). Inputs (B,); returns two (B,) tensors, not detached."""
    return beta * (policy_chosen_logps - ref_chosen_logps), beta * (policy_rejected_logps - ref_rejected_logps)
