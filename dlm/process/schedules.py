"""Noise schedules: alpha_t, the probability that a token is still clean at time t in [0, 1].

Every schedule goes from alpha_0 = 1 to alpha_1 = eps and gives alpha_t and its derivative in closed form.
The MDLM loss weight is -alpha'_t / (1 - alpha_t); for the log-linear schedule it is exactly 1/t.
"""

from __future__ import annotations

import math

import torch


class NoiseSchedule:
    """Base class: subclasses define `alpha(t)` and `dalpha(t)` for t (any shape) in [0, 1]."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'_t / (1 - alpha_t) > 0: the weight of a masked token's cross-entropy in the NELBO."""
        return -self.dalpha(t) / (1.0 - self.alpha(t))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps})"


class LogLinearSchedule(NoiseSchedule):
    """alpha_t = 1 - (1 - eps) t: the mask rate grows linearly in t (MDLM's default)."""

    def alpha(self, t):
        return 1.0 - (1.0 - self.eps) * t

    def dalpha(self, t):
        return torch.full_like(t, -(1.0 - self.eps))

    def loss_weight(self, t):
        return 1.0 / t  # exact: (1-eps) / ((1-eps) t)


class CosineSchedule(NoiseSchedule):
    """alpha_t = eps + (1 - eps) cos(pi t / 2): few masks early, many late."""

    def alpha(self, t):
        return self.eps + (1.0 - self.eps) * torch.cos(0.5 * math.pi * t)

    def dalpha(self, t):
        return -(1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)


class LinearSchedule(NoiseSchedule):
    """The total noise sigma_t = t log(1/eps) grows linearly and alpha_t = exp(-sigma_t) (MDLM's "linear")."""

    def __init__(self, eps: float = 1e-3):
        if eps <= 0:
            raise ValueError("the linear schedule needs process.eps > 0 (alpha_1 = eps)")
        super().__init__(eps)
        self.sigma_max = -math.log(eps)

    def alpha(self, t):
        return torch.exp(-self.sigma_max * t)

    def dalpha(self, t):
        return -self.sigma_max * torch.exp(-self.sigma_max * t)


def time_of_mask_rate(schedule: "NoiseSchedule", rate: torch.Tensor | float, iters: int = 60) -> torch.Tensor:
    """The time t in [0, 1] at which the mask rate 1 - alpha_t equals `rate` (any shape), by bisection.

    alpha_t is decreasing in t for every schedule, so the mask rate is increasing; rates at or above the largest
    one (1 - alpha_1 = 1 - eps) map to t = 1, rates <= 0 to t = 0.
    """
    rate = torch.as_tensor(rate, dtype=torch.float64)
    lo, hi = torch.zeros_like(rate), torch.ones_like(rate)
    for _ in range(iters):  # 2^-60: exact to float64 precision
        mid = (lo + hi) / 2
        below = (1.0 - schedule.alpha(mid)) < rate
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return torch.where(rate >= 1.0 - schedule.alpha(torch.ones_like(rate)), 1.0, hi)


SCHEDULES = {"loglinear": LogLinearSchedule, "cosine": CosineSchedule, "linear": LinearSchedule}


def make_schedule(name: str, eps: float) -> NoiseSchedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule '{name}'; valid: {', '.join(SCHEDULES)}")
    return SCHEDULES[name](eps)
