"""Small stateful helpers of the RL loop whose state goes into checkpoints: the KL coefficient controllers and
running reward moments. Each has ``state_dict()`` / ``load_state_dict()`` holding plain Python floats and ints.
"""

from __future__ import annotations

import math

import torch


class FixedKLController:
    """A constant KL coefficient; ``update`` leaves it unchanged."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional control of the KL coefficient towards a target KL (Ziegler et al. 2019, arXiv:1909.08593,
    Sec. 2.2): e = clip(KL / target - 1, -0.2, 0.2), coef <- coef * (1 + e * n_steps / horizon).

    ``current_kl`` is the measured KL (nats per sequence, as the target), ``n_steps`` the number of samples (or
    steps, as the horizon is counted) since the last update; K_beta of the paper is n_steps / horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got {target} and {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


class RunningMoments:
    """Running mean and unbiased std of every value seen, for reward normalisation.

    Batches are merged with the parallel form of Welford's update (Chan et al. 1979): for counts n_a, n_b, means
    m_a, m_b and sums of squared deviations M_a, M_b, with d = m_b - m_a: n = n_a + n_b, m = m_a + d * n_b / n,
    M = M_a + M_b + d^2 * n_a * n_b / n. Statistics are kept in Python floats (float64) whatever the input dtype.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, values: torch.Tensor, reduce=None) -> None:
        """Add every element of ``values`` (any shape) to the statistics. ``reduce``: sums a small tensor over the
        ranks of a data-parallel run (an all-reduce), so that every rank adds the whole global batch and all ranks
        keep the same statistics."""
        flat = values.detach().reshape(-1).double()
        if reduce is None:
            n = flat.numel()
            if n == 0:
                return
            batch_mean = float(flat.mean())
            batch_m2 = float((flat - batch_mean).square().sum())
        else:
            count, total = reduce(torch.stack([torch.tensor(float(flat.numel()), dtype=torch.float64, device=flat.device),
                                               flat.sum()])).tolist()
            n = int(count)
            if n == 0:
                return
            batch_mean = total / n
            batch_m2 = float(reduce((flat - batch_mean).square().sum().reshape(1))[0])
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def var(self) -> float:
        """Unbiased variance (n - 1) of all values seen; NaN before two values."""
        return self.m2 / (self.count - 1) if self.count > 1 else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])
