"""Score-entropy maths (SEDD, Lou, Meng, Ermon, ICML 2024, arXiv 2310.16834): noise levels, the two graphs, the
denoising score entropy and the reverse steps the score samplers take. Plain functions of tensors, shared by the
SEDD process (dlm/process/sedd.py) and the score samplers (dlm/sampler/score.py).

Notation (docs/sedd.md, SPEC §6). sigma = σ̄(t), the total noise at time t; dsigma = σ'(t), its rate. Per position,
the forward process is p_t(·|x0) = exp(σ̄ R)[x0, ·] for a rate matrix R (R[a, b]: the rate of a -> b, a ≠ b):
  absorbing: R[a, m] = 1 for a ≠ m (a token jumps to [MASK] m): p_t = e^{-σ̄} δ_x0 + (1 - e^{-σ̄}) δ_m;
  uniform:   R[a, b] = 1/N for a ≠ b (a token is replaced by one drawn from all N): p_t = e^{-σ̄} δ_x0 + (1 - e^{-σ̄})/N.
SPEC writes Q(x, y) for the rate *into* x from y (SEDD's column convention): Q(x, y) = R[y, x].
The score s(x)_y ≈ p_t(x with the position set to y) / p_t(x); networks give log-scores, with log s = 0 at the
current token. Every function takes log-scores `log_s` (N, V) of N positions, their current tokens x (N,) and
per-position noise (N,); the vocabulary V is the graph's N (the absorbing graph's includes m).
"""

from __future__ import annotations

import math

import torch

GRAPHS = ("absorbing", "uniform")
NOISES = ("loglinear", "geometric")


# ------------------------------------------------------------------------------------------ noise
class LogLinearNoise:
    """σ̄(t) = -log(1 - (1 - eps) t): e^{-σ̄} is MDLM's log-linear alpha_t = 1 - (1 - eps) t."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def total(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log1p(-(1.0 - self.eps) * t)

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * t)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - (1.0 - self.eps) * t

    def __repr__(self) -> str:
        return f"LogLinearNoise(eps={self.eps})"


class GeometricNoise:
    """σ̄(t) = σ_min^{1-t} σ_max^t, σ'(t) = σ̄(t) log(σ_max / σ_min) (SEDD's default for the uniform graph)."""

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def total(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min ** (1.0 - t) * self.sigma_max ** t

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        return self.total(t) * math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.total(t))

    def __repr__(self) -> str:
        return f"GeometricNoise(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


def make_noise(name: str, eps: float = 1e-3, sigma_min: float = 1e-4, sigma_max: float = 20.0):
    if name == "loglinear":
        return LogLinearNoise(eps)
    if name == "geometric":
        return GeometricNoise(sigma_min, sigma_max)
    raise ValueError(f"unknown process.noise '{name}'; valid: {', '.join(NOISES)}")


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.unsqueeze(-1)


# ------------------------------------------------------------------------------------------ the objective
def score_entropy(graph: str, log_s: torch.Tensor, x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
                  mask_id: int | None = None) -> torch.Tensor:
    """The denoising score entropy of N positions, (N,) float32, without the weight σ'(t):

        sum_{y ≠ x} Q(x, y) [ s_y - r_y log s_y + K(r_y) ],  r_y = p_t(y|x0) / p_t(x|x0),  K(a) = a (log a - 1)

    (K makes each term non-negative: a - r log a + K(r) ≥ 0 with equality at a = r.) log_s (N, V) log-scores at the
    current tokens x (N,), clean tokens x0 (N,), sigma (N,) total noise σ̄(t).

    absorbing: only x = m counts (Q(x, y) = 0 for a clean x); Q(m, y) = 1 for y ≠ m, r_x0 = 1/(e^σ̄ - 1), r_y = 0
      otherwise, so the term is  sum_{y≠m} s_y - r log s_x0 + r (log r - 1).
    uniform: Q(x, y) = 1/N. x = x0: r_y = (e^σ̄ - 1)/(e^σ̄ - 1 + N) =: ρ for every y ≠ x;
      x ≠ x0: r_x0 = 1 + N/(e^σ̄ - 1), r_y = 1 for y ∉ {x, x0}.
    """
    log_s = log_s.float()  # reductions over V in float32; the (N,) terms combined in float64 (r can be ~1e4)
    em1 = torch.expm1(sigma.double())  # e^σ̄ - 1, accurate for small σ̄
    at = lambda idx: log_s.gather(-1, _col(idx)).squeeze(-1).double()  # noqa: E731
    if graph == "absorbing":
        masked = x == mask_id
        keep = torch.ones(log_s.shape[-1], dtype=torch.bool, device=log_s.device)
        keep[mask_id] = False
        r = 1.0 / em1
        pos = torch.logsumexp(log_s[:, keep], -1).double().exp()  # sum_{y≠m} s_y
        out = pos - r * at(x0) + r * (torch.log(r) - 1.0)
        return torch.where(masked, out, 0.0).float()
    if graph == "uniform":
        n = log_s.shape[-1]
        same = x == x0
        s_x = at(x)
        pos = log_s.exp().mean(-1).double() - s_x.exp() / n  # (1/N) sum_{y≠x} s_y
        ratio = em1 / (em1 + n)  # ρ
        neg_all = log_s.mean(-1).double() - s_x / n  # (1/N) sum_{y≠x} log s_y
        neg = torch.where(same, ratio * neg_all, neg_all + at(x0) / em1)
        r_x0 = 1.0 + n / em1
        const = torch.where(same, (n - 1) / n * ratio * (torch.log(ratio) - 1.0),
                            (r_x0 * (torch.log(r_x0) - 1.0) - (n - 2)) / n)
        return (pos - neg + const).float()
    raise ValueError(f"unknown graph '{graph}'; valid: {', '.join(GRAPHS)}")


def prior_kl(graph: str, sigma_end: torch.Tensor, n: int) -> torch.Tensor:
    """KL(p_1(·|x0) || prior) per token at the end's total noise σ̄(1): the uniform graph's prior term (its prior,
    uniform over N, has full support). The absorbing graph's would be infinite for a finite σ̄(1) (p_1 keeps mass
    e^{-σ̄(1)} on x0, the all-[MASK] prior none): like MDLM, the absorbing bound treats t = 1 as fully masked."""
    if graph != "uniform":
        return torch.zeros_like(sigma_end)
    a = torch.exp(-sigma_end.double())
    p0 = a + (1 - a) / n
    other = (1 - a) / n
    return p0 * torch.log(p0 * n) + (n - 1) * other * torch.log1p(-a)


# ------------------------------------------------------------------------------------------ reverse steps
def euler_probs(graph: str, log_s: torch.Tensor, x: torch.Tensor, step_rate: torch.Tensor,
                mask_id: int | None = None) -> torch.Tensor:
    """SEDD's Euler step (N, V) float32: one-hot(x) + Δt σ'(t) (Q^T ⊙ s) with the diagonal minus the row sum. The
    reverse rate from x to y ≠ x is the forward rate into x from y times the score: Q(x, y) s_y = R[y, x] s_y, so
    x moves to y with probability Δt σ'(t) R[y, x] s_y and stays with the rest. step_rate (N,) = Δt σ'(t). A stay
    probability below 0 (a step too large for the rates) is set to 0: the caller samples from the non-negative
    row, normalised."""
    s = log_s.float().exp()
    if graph == "absorbing":
        rates = s * (x == mask_id).unsqueeze(-1)  # from m to every y (clean tokens never move)
        rates[:, mask_id] = 0.0
    elif graph == "uniform":
        rates = s / s.shape[-1]
    else:
        raise ValueError(f"unknown graph '{graph}'; valid: {', '.join(GRAPHS)}")
    rates = rates * step_rate.float().unsqueeze(-1)
    rates = rates.scatter(-1, _col(x), 0.0)
    stay = (1.0 - rates.sum(-1)).clamp(min=0.0)
    return rates.scatter(-1, _col(x), _col(stay))


def tweedie_probs(graph: str, log_s: torch.Tensor, x: torch.Tensor, dsigma: torch.Tensor,
                  mask_id: int | None = None, drop_mask: bool = False) -> torch.Tensor:
    """SEDD's analytic (Tweedie τ-leaping) step (N, V) float32 from total noise σ̄(t) to σ̄(t) - Δσ: the staggered
    score exp(-Δσ Q) s times the transposed transition exp(Δσ Q)[·, x]. dsigma (N,) = Δσ. Negative entries (an
    inexact score) are set to 0. drop_mask: the final denoising step's absorbing form, the [MASK] column removed
    (its probability set to 0), so a masked position always takes a token.

    absorbing, at a mask: p(v) = (e^{Δσ} - 1) s_v for v ≠ m, p(m) = 1 - (e^{Δσ} - 1) sum_{v≠m} s_v (with the RADD
      score s_v = p_θ(v) / (e^σ̄ - 1) this is MDLM's ancestral step, (α_s - α_t)/(1 - α_t) p_θ(v)); a clean x stays.
    uniform: staggered s'_y = s_y e^{Δσ} + (e^{-Δσ} - 1) e^{Δσ} / N sum s, transition e^{-Δσ} δ_x + (1 - e^{-Δσ})/N.
    """
    s = log_s.float().exp()
    d = _col(dsigma.float())
    if graph == "absorbing":
        masked = _col(x == mask_id)
        s = s.clone()
        s[:, mask_id] = 0.0
        up = torch.expm1(d) * s  # (e^{Δσ} - 1) s_v, v ≠ m
        stay = (1.0 - up.sum(-1, keepdim=True)).clamp(min=0.0)
        if drop_mask:
            stay = torch.zeros_like(stay)
        at_mask = up.scatter(-1, torch.full_like(_col(x), mask_id), stay)
        onehot = torch.zeros_like(s).scatter(-1, _col(x), 1.0)
        return torch.where(masked, at_mask, onehot)
    if graph == "uniform":
        n = s.shape[-1]
        epow = torch.exp(-d)  # e^{-Δσ}
        stag = s / epow + (epow - 1.0) / (n * epow) * s.sum(-1, keepdim=True)
        trans = ((1.0 - epow) / n).expand_as(s).scatter(-1, _col(x), epow + (1.0 - epow) / n)
        return (stag * trans).clamp(min=0.0)
    raise ValueError(f"unknown graph '{graph}'; valid: {', '.join(GRAPHS)}")


def sample_probs(probs: torch.Tensor, u: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """One draw per row of non-negative (unnormalised) probs (N, V) by inverse CDF in float64 (u (N,) float64
    uniforms); a row with no mass keeps its `fallback` (N,) token."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1]
    target = (u.double().clamp_min(1e-12) * total).unsqueeze(-1)  # > 0: zero-probability tokens are never hit
    drawn = torch.searchsorted(cdf, target).squeeze(-1).clamp_max(probs.shape[-1] - 1)
    return torch.where(total > 0, drawn, fallback)
