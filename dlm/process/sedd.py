"""SEDD: score-entropy discrete diffusion (Lou, Meng, Ermon, ICML 2024, arXiv 2310.16834), over the absorbing or the
uniform graph, with log-linear or geometric noise (the maths: dlm/process/score_graphs.py, docs/sedd.md).

The network outputs log-scores: log s_θ(z_t)_{l,y} ≈ log p_t(z_t with position l set to y) / p_t(z_t), with log s = 0
forced at the current token. Absorbing graph with `scale_by_sigma` (SEDD's default there): the raw output is
shifted by -log(e^σ̄ - 1) - log(N - 1) (N - 1 tokens other than [MASK]), so a network that ignores t can still
express the true score, p(x0 = v | unmasked) / (e^σ̄ - 1) (RADD); `denoise` then reads the raw output over the
tokens other than [MASK] as the denoising distribution (p ∝ s), which lets MDLM's samplers run a SEDD-absorbing model.

Loss: the denoising score entropy weighted by σ'(t), t ~ U[sampling_eps, 1] (antithetic over the batch, as MDLM):

    NELBO(x) = E_t [ σ'(t) sum_l sum_{y ≠ z^l} Q(z^l, y) ( s_y - r_y log s_y + K(r_y) ) ]  (+ the prior term)

with r_y = p_t(y|x^l)/p_t(z^l|x^l) and K(a) = a (log a - 1), so every term is ≥ 0 and the sum is the continuous-time
bound on -log p(x) (SEDD Thm 3.6; `likelihood = "bound"`, in MDLM's convention: t is drawn from [sampling_eps, 1],
and the absorbing graph treats t = 1 as fully masked, as MDLM does; the uniform graph adds its prior term
KL(p_1(·|x^l) || uniform), ≈ 0 for geometric noise). `loss` is that bound per scored token, `nelbo` its Monte Carlo
mean over `num_t_samples` times. Given positions are neither corrupted nor scored (`honour_given`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dlm.process.base import LossOutput, Process, ProcessConfig, register_process
from dlm.process.mdlm import antithetic_times, evaluation_times, subs_logits, uniform
from dlm.process.schedules import time_of_mask_rate
from dlm.process.score_graphs import GRAPHS, NOISES, make_noise, prior_kl, score_entropy


@dataclass
class SEDDConfig(ProcessConfig):
    name: str = "sedd"
    graph: str = "absorbing"  # "absorbing" (tokens become [MASK]) | "uniform" (tokens become uniform random tokens)
    noise: str = "loglinear"  # "loglinear" (sigma(t) = -log(1 - (1 - eps) t)) | "geometric"
    eps: float = 1e-3  # log-linear: e^{-sigma(1)} = eps
    sigma_min: float = 1e-4  # geometric: sigma(t) = sigma_min^(1-t) sigma_max^t
    sigma_max: float = 20.0
    sampling_eps: float = 1e-3  # t is drawn from [sampling_eps, 1]
    antithetic: bool = True  # low-discrepancy time sampling over the batch
    scale_by_sigma: bool = True  # absorbing: log s = output - log(e^sigma - 1) - log(N - 1) (SEDD's default)


@register_process
class SEDD(Process):
    """Score-entropy discrete diffusion; `corruption` is the graph's ("absorbing" or "uniform", per instance)."""

    name = "sedd"
    corruption = "absorbing"  # the default graph's; an instance with graph="uniform" says "uniform"
    config_class = SEDDConfig
    default_sampler = "tweedie"

    def __init__(self, graph: str, noise, mask_id: int | None, sampling_eps: float = 1e-3, antithetic: bool = True,
                 scale_by_sigma: bool = True, time_conditioning: bool = False):
        super().__init__(mask_id, time_conditioning)
        if graph not in GRAPHS:
            raise ValueError(f"unknown process.graph '{graph}'; valid: {', '.join(GRAPHS)}")
        if graph == "absorbing" and mask_id is None:
            raise ValueError("the absorbing graph needs a [MASK] token: use a tokenizer with one, or "
                             "process.graph=uniform")
        self.graph, self.noise = graph, noise
        self.corruption = graph
        self.sampling_eps, self.antithetic = sampling_eps, antithetic
        self.scale_by_sigma = scale_by_sigma and graph == "absorbing"

    @classmethod
    def from_config(cls, cfg, description):
        noise = make_noise(cfg.noise, cfg.eps, cfg.sigma_min, cfg.sigma_max)
        return cls(cfg.graph, noise, description.mask_id, cfg.sampling_eps, cfg.antithetic, cfg.scale_by_sigma,
                   description.time_conditioning)

    @classmethod
    def check_config(cls, cfg) -> None:
        p = cfg.process
        if p.graph not in GRAPHS:
            raise ValueError(f"unknown process.graph '{p.graph}'; valid: {', '.join(GRAPHS)}")
        if p.noise not in NOISES:
            raise ValueError(f"unknown process.noise '{p.noise}'; valid: {', '.join(NOISES)}")
        for name in ("eps", "sampling_eps"):
            if not 0.0 <= getattr(p, name) < 1.0:
                raise ValueError(f"process.{name}={getattr(p, name)} must be in [0, 1)")
        if p.noise == "loglinear" and p.eps <= 0:
            raise ValueError("process.eps must be > 0 for log-linear noise (sigma(1) = -log eps)")
        if not 0.0 < p.sigma_min < p.sigma_max:
            raise ValueError(f"need 0 < process.sigma_min < process.sigma_max, got {p.sigma_min} and {p.sigma_max}")
        if cfg.trainer.chunked_ce:
            raise ValueError("trainer.chunked_ce applies to cross-entropy losses (mdlm, ar); process=sedd computes its "
                             "score entropy on the scored positions' logits at once: set trainer.chunked_ce=0")

    def extra_repr(self) -> str:
        return f"graph={self.graph}, noise={self.noise}, mask_id={self.mask_id}"

    # ------------------------------------------------------------------------------------ time
    def total_noise(self, t):
        return self.noise.total(torch.as_tensor(t, dtype=torch.float64))

    def noise_rate(self, t):
        return self.noise.rate(torch.as_tensor(t, dtype=torch.float64))

    def alpha(self, t):
        """e^{-σ̄(t)}: the probability that a token has not been moved (absorbing: is not [MASK])."""
        return self.noise.alpha(t)

    def time_of_mask_rate(self, rate):
        return time_of_mask_rate(self.noise, rate)

    # ------------------------------------------------------------------------------------ parameterisation
    def denoise(self, logits: torch.Tensor) -> torch.Tensor:
        """Absorbing: the raw output over the tokens other than [MASK] (p(x0 = v) ∝ s_v, RADD), the [MASK] logit
        -inf. Uniform: the raw output as it is (normalised, the model's p_t(z^l = y | the other positions): the
        score is a ratio of noisy marginals, not a clean-token prediction)."""
        return subs_logits(logits, self.mask_id) if self.graph == "absorbing" else logits.float()

    def _log_score(self, raw: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Log-scores (..., V) float32 from raw outputs (..., V) at tokens z (...) with total noise sigma (...)."""
        out = raw.float()
        if self.scale_by_sigma:
            out = out - (torch.log(torch.expm1(sigma.double())) + math.log(out.shape[-1] - 1)).float().unsqueeze(-1)
        return out.scatter(-1, z.unsqueeze(-1), 0.0)

    def log_score(self, logits: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Log-scores (B, L, V) from raw logits (B, L, V) on z (B, L) at each row's time t (B,)."""
        sigma = self.total_noise(torch.as_tensor(t, device=logits.device))
        while sigma.dim() < z.dim():
            sigma = sigma.unsqueeze(-1)
        return self._log_score(logits, z, sigma.expand(z.shape))

    # ------------------------------------------------------------------------------------ objective
    def add_noise(self, x: torch.Tensor, t: torch.Tensor, loss_mask: torch.Tensor, generator=None) -> torch.Tensor:
        """z_t (B, L): each position of loss_mask moves with probability 1 - e^{-σ̄(t)} (t (B,)): to [MASK]
        (absorbing) or to a token drawn uniformly from all N (uniform). generator: one, or one per row."""
        p_move = (1.0 - self.alpha(t.double())).float()[:, None]  # (B, 1)
        u = uniform(x.shape, generator, x.device)
        move = (u < p_move) & loss_mask
        if self.graph == "absorbing":
            return torch.where(move, self.mask_id, x)
        n = self.vocab_size
        drawn = (uniform(x.shape, generator, x.device) * n).long().clamp_max(n - 1)
        return torch.where(move, drawn, x)

    def loss(self, network, batch: dict, generator: torch.Generator | None = None, t: torch.Tensor | None = None
             ) -> LossOutput:
        """The bound per scored token of one batch at t (B,) (drawn antithetically unless given). Random draws: t,
        then z_t (MDLM's order: with the same generator an absorbing SEDD sees MDLM's t and z_t)."""
        batch = self.honour_given(batch)
        x, loss_mask = batch["input_ids"], batch["loss_mask"]
        if t is None:
            t = antithetic_times(x.shape[0], self.sampling_eps, generator, x.device, self.antithetic)
        z = self.add_noise(x, t, loss_mask, generator)
        # absorbing: only masked positions have terms; uniform: every scored position
        scored = (z == self.mask_id) & loss_mask if self.graph == "absorbing" else loss_mask  # (B, L)
        raw = self.forward_logits(network, z, t, batch, logits_at=scored)  # (N, V)
        sigma = self.total_noise(t)[:, None].expand_as(z)[scored]  # (N,)
        log_s = self._log_score(raw, z[scored], sigma)
        dse = score_entropy(self.graph, log_s, z[scored], x[scored], sigma, self.mask_id)  # (N,)
        terms = dse * self.noise_rate(t).float()[:, None].expand_as(z)[scored]  # (N,)
        row_of = scored.nonzero()[:, 0]
        per_row = torch.zeros(x.shape[0], device=x.device, dtype=terms.dtype).index_add(0, row_of, terms)
        if self.graph == "uniform":  # the prior term, the same for every scored token
            kl = prior_kl(self.graph, self.total_noise(torch.ones((), device=x.device)), self.vocab_size)
            per_row = per_row + float(kl) * loss_mask.sum(1)
        total = per_row.sum()
        num_tokens = loss_mask.sum()
        return LossOutput(total / num_tokens.clamp(min=1), total.detach(), num_tokens.detach(), per_row.detach(),
                          loss_mask.sum(1))

    @torch.no_grad()
    def nelbo(self, network, batch: dict, num_t_samples: int, generator) -> LossOutput:
        """Monte Carlo bound of each sequence with `num_t_samples` antithetic times per sequence (evaluation).
        generator: one, or a list of one per row (each row's times and noise then depend on its own only)."""
        batch = self.honour_given(batch)
        x = batch["input_ids"]
        times = evaluation_times((x.shape[0],), num_t_samples, self.sampling_eps, generator, x.device)  # (B, n)
        nll_sum = torch.zeros((), device=x.device, dtype=torch.float64)
        per_row = torch.zeros(x.shape[0], device=x.device, dtype=torch.float64)
        for j in range(num_t_samples):
            out = self.loss(network, batch, generator, t=times[:, j])
            nll_sum += out.nll_sum.double()
            per_row += out.nll_per_row.double()
        num_tokens = batch["loss_mask"].sum()
        return LossOutput(nll_sum / num_t_samples / num_tokens, nll_sum / num_t_samples, num_tokens,
                          per_row / num_t_samples, batch["loss_mask"].sum(1))
