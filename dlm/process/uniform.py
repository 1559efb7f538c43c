"""Uniform-state diffusion (UDLM, `process=udlm`) and GIDD's mix of [MASK] and uniform noise (`process=gidd`),
trained with their continuous-time ELBO, with DiffusionGemma-style self-conditioning as an option.

Notation (SPEC.md): x the clean token of a position, z_t its noised token, alpha_t the probability that it is still
clean, V the network's classes, m the [MASK] id. Both processes interpolate (GIDD, von Rütte et al. 2025, arXiv
2503.04482):

    q_t(z | x) = alpha_t delta_x(z) + beta_t pi_t(z),   beta_t = 1 - alpha_t,
    beta_t pi_t = m_t delta_m + u_t U,     U uniform over the N = V - 1 tokens other than [MASK]
                                           (N = V when the model has no [MASK]), alpha_t + m_t + u_t = 1.

  udlm: m_t = 0, u_t = 1 - alpha_t (alpha_t from `schedule`: log-linear 1 - (1-eps) t by default). Decision: the
        uniform noise never draws [MASK], and x_theta never predicts it: the token never occurs in data, so a state
        for it would only dilute the noise (and the prior), and a tokenizer with a [MASK] (dlm's) stays usable.
  gidd: alpha_t = (1 - t)/C_t, m_t = t/C_t, u_t = c_t/C_t, c_t = B (t(1-t))^(gamma/2), C_t = 1 + c_t,
        B = 2^gamma p_u / (1 - p_u): the uniform share u_t peaks at t = 1/2 (gamma <= 2), where it is exactly p_u;
        all [MASK] at t = 1 (the prior), clean at t = 0 (GIDD's mask + uniform mixing schedule as we read the
        paper; the tests check these properties, not the paper's numbers).

**Forward rates.** q_t is the marginal of a Markov chain whose transition s -> t is
q_{t|s}(z_t | z_s) = alpha_{t|s} delta + (beta_t pi_t - alpha_{t|s} beta_s pi_s)(z_t), alpha_{t|s} = alpha_t/alpha_s
(a distribution when the second term is >= 0). Its rate of jumping from any y to z != y is, by d/dt at s = t,

    rho_t(z) = (beta pi)'_t(z) - (alpha'_t / alpha_t) (beta pi)_t(z)         (the same for every y)

  udlm: rho_t(z) = -alpha'_t / (N alpha_t) for z != m;
  gidd: rho_t(m) = 1/(C_t (1 - t)),  rho_t(z) = c_t [(gamma/2)(1 - 2t) + t] / (N t (1 - t) C_t) for z != m.

**Parameterisation** (x0): the network predicts x_theta, clean-token logits ([MASK] at -inf), and the reverse step
is the forward posterior with x_theta in place of x, p_theta(z_s | z_t) = q(z_s | z_t, x_theta) (UDLM's and
GIDD's), which `reverse_probs` computes for the sampler:

    q(z_s = y | z_t = z, x) ∝ (alpha_{t|s} [y = z] + g(z)) q_s(y | x),
    g(z) = beta_t pi_t(z) - alpha_{t|s} beta_s pi_s(z),

whose numerator and normaliser (q_t(z | x)) are both linear in x, so the probability vector x_theta may stand in
for the one-hot x.

**The continuous-time ELBO.** Write a = q_t(. | x) and b = q_t(. | x_theta) = alpha_t x_theta + beta_t pi_t. As the
step s -> t shrinks, q(z_s = y | z_t = z, x) = dt rho_t(z) a_y / a_z + o(dt) for y != z, and the same with b for
p_theta, so the per-step KL(q || p_theta) = dt sum_{y != z} [R^theta_y - R_y + R_y log(R_y / R^theta_y)] + o(dt),
R_y = rho_t(z) a_y/a_z, R^theta_y = rho_t(z) b_y/b_z (the generalised KL between reverse rates). Summing with
sum_y a_y = sum_y b_y = 1, the T-step discrete ELBO tends, per position, to

    NELBO = KL(q_1(. | x) || prior) + int_0^1 E_{z ~ q_t(. | x)} [ (rho_t(z) / a_z) (KL(a || b) + IS(a_z, b_z)) ] dt,

IS(a, b) = a/b - log(a/b) - 1 the Itakura-Saito divergence (GIDD's "KL plus IS" form; for the uniform graph it is
term for term UDLM's continuous-time loss, Schiff et al. 2024, arXiv 2412.10193, with x-bar = N a, x-bar_theta = N b:
alpha'_t/(N alpha_t) [N/x-bar_z - N/x-bar_theta,z - sum_j x-bar_j/x-bar_z log(x-bar_theta,z x-bar_j /
(x-bar_theta,j x-bar_z))]). For the absorbing interpolation (u = 0, m = beta) it is MDLM's -alpha'/(1-alpha) log
x_theta(x). With a_y, b_y in closed form (x != m, x_theta(m) = 0, d_y = log(u_t/N) - log b_y):

    KL(a || b) = (alpha_t + u_t/N) log((alpha_t + u_t/N) / b_x) + (u_t/N) sum_{y != x, m} d_y,
    IS(a_z, b_z) = 0 at z = m;  from log(a_z/b_z) = log((alpha_t + u_t/N)/b_x) at z = x, d_z elsewhere.

The prior term is 0 for gidd (q_1 = delta_m) and KL(alpha_1 delta_x + beta_1 U || U) for udlm (alpha_1 = eps).
Like MDLM, t is drawn from [sampling_eps, 1] (gidd: up to 1 - sampling_eps, where rho_t(m) has its integrable
1/(1-t)); every position of the loss mask is scored (a clean-looking token may be noise). tests/process/
test_uniform.py checks the bound against the discrete-time ELBO by exact enumeration as the number of steps grows
and against the exact likelihood of the T-step model.

**Self-conditioning** (`process.self_conditioning=p`, 0 = off): DiffusionGemma's form, shared with `mdlm_sc`'s
two-pass pattern (dlm/process/self_conditioning.py, `SelfConditioningFeedback` with a `GeGLUSelfConditioning`
block): with probability p a training batch first predicts without gradients, and softmax(x_theta) @ E ->
RMSNorm -> GeGLU MLP is added to the embeddings of every generated position, the sum RMS-normalised back to the
embeddings' own scale (`rescaled_sum`); the block's down projection starts at zero (a model starts plain). At
sampling each call is fed the previous call's prediction (`feedback()`). The NELBO for evaluation feeds it at every
time (a two-pass denoiser that depends on z_t only: still a bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlm.process.base import LossOutput, Process, ProcessConfig, register_process
from dlm.process.feedback import coin, second_pass_inputs
from dlm.process.mdlm import antithetic_times, evaluation_times, uniform
from dlm.process.schedules import SCHEDULES, make_schedule, time_of_mask_rate
from dlm.process.self_conditioning import GeGLUSelfConditioning, SelfConditioningFeedback


@dataclass
class InterpolatingConfig(ProcessConfig):
    sampling_eps: float = 1e-3  # t is drawn from [sampling_eps, 1] (gidd: to 1 - sampling_eps)
    antithetic: bool = True  # low-discrepancy time sampling over the batch
    self_conditioning: float = 0.0  # probability that a training batch is self-conditioned (0: off)


@dataclass
class UniformConfig(InterpolatingConfig):
    name: str = "udlm"
    schedule: str = "loglinear"  # alpha_t: "loglinear" | "cosine" | "linear" (dlm.process.schedules)
    eps: float = 1e-3  # alpha_1 = eps


@dataclass
class GIDDConfig(InterpolatingConfig):
    name: str = "gidd"
    p_u: float = 0.2  # the uniform share of q_t at t = 1/2, its largest (GIDD's p_u)
    gamma: float = 1.0  # the shape of the uniform share's bump, c_t ∝ (t(1-t))^(gamma/2), in (0, 2]


def check_interpolating(p) -> None:
    if not 0.0 <= p.sampling_eps < 0.5:
        raise ValueError(f"process.sampling_eps={p.sampling_eps} must be in [0, 0.5)")
    if not 0.0 <= p.self_conditioning <= 1.0:
        raise ValueError(f"process.self_conditioning={p.self_conditioning} must be in [0, 1] (the probability that "
                         "a training batch is self-conditioned; 0 turns it off)")


class InterpolatingDiffusion(Process):
    """q_t(z|x) = alpha_t delta_x + m_t delta_[MASK] + u_t U (module docstring). Subclasses give `masses(t)` ->
    (alpha_t, m_t, u_t) and `rates(t)` -> (rho_t(m), N rho_t(z != m)), float64 tensors of t's shape."""

    likelihood = "bound"
    default_sampler = "uniform_ancestral"
    t_max = 1.0  # the largest training time

    def __init__(self, mask_id: int | None, vocab_size: int, sampling_eps: float = 1e-3, antithetic: bool = True,
                 time_conditioning: bool = False, self_conditioning: float = 0.0, d_model: int = 0):
        super().__init__(mask_id, time_conditioning)
        if vocab_size < 2 + (mask_id is not None):
            raise ValueError(f"process '{self.name}' needs the model's vocabulary size (ModelDescription.vocab_size; "
                             f"got {vocab_size})")
        self.classes = vocab_size  # V
        self.states = vocab_size - (mask_id is not None)  # N: the tokens uniform noise draws from
        self.sampling_eps, self.antithetic, self.p_sc = sampling_eps, antithetic, self_conditioning
        if self_conditioning > 0:
            if d_model <= 0:
                raise ValueError(f"process '{self.name}' sizes its self-conditioning block by the model's width, "
                                 "which it was not told (ModelDescription.d_model)")
            self.self_conditioner = GeGLUSelfConditioning(d_model)
        self.last_applied = False

    # ------------------------------------------------------------------------------------ the schedule
    def masses(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def rates(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def prior_kl(self) -> float:
        """KL(q_1(.|x) || prior) per position (nats); the same for every x."""
        return 0.0

    def alpha(self, t):
        t = torch.as_tensor(t)
        return self.masses(t.double())[0].to(t.dtype if t.is_floating_point() else torch.float64)

    def time_of_mask_rate(self, rate):
        return time_of_mask_rate(self, rate)

    def noise_probs(self, t: torch.Tensor) -> torch.Tensor:
        """beta_t pi_t: (n, V) float64 for times t (n,)."""
        _, m, u = self.masses(t.double())
        out = (u / self.states)[:, None].expand(-1, self.classes).clone()
        if self.mask_id is not None:
            out[:, self.mask_id] = m
        return out

    # ------------------------------------------------------------------------------------ corruption
    def uniform_tokens(self, u: torch.Tensor) -> torch.Tensor:
        """Tokens drawn uniformly from the N non-[MASK] tokens by uniforms u in [0, 1) (any shape)."""
        idx = (u * self.states).long().clamp(0, self.states - 1)
        return idx if self.mask_id is None else idx + (idx >= self.mask_id).long()

    def add_noise(self, x: torch.Tensor, t: torch.Tensor, loss_mask: torch.Tensor, generator=None) -> torch.Tensor:
        """z_t (B, L) for times t (B,): a position of loss_mask stays x with prob alpha_t, becomes [MASK] with prob
        m_t, else a uniform token. Draws u1 then u2 (B, L) (a list of per-row generators: each row its own)."""
        alpha, m, _ = (v.float()[:, None] for v in self.masses(t.double()))  # (B, 1)
        u1 = uniform(x.shape, generator, x.device)
        u2 = uniform(x.shape, generator, x.device)
        masked = m / (1 - alpha).clamp(min=1e-12)  # P(mask | noise)
        noise = self.uniform_tokens(((u2 - masked) / (1 - masked).clamp(min=1e-12)).clamp(0, 1 - 1e-7))
        if self.mask_id is not None:
            noise = torch.where(u2 < masked, self.mask_id, noise)
        return torch.where((u1 >= alpha) & loss_mask, noise, x)

    def prior(self, canvas, to_generate, generator=None):
        if self.corruption != "uniform":
            return super().prior(canvas, to_generate, generator)  # mixed: [MASK]
        noise = torch.zeros_like(canvas)
        if isinstance(generator, (list, tuple)):  # one generator per row: each row draws at its own positions
            for r, g in enumerate(generator):
                u = torch.rand(int(to_generate[r].sum()), generator=g, device=canvas.device)
                noise[r, to_generate[r]] = self.uniform_tokens(u)
        else:
            noise = self.uniform_tokens(torch.rand(canvas.shape, generator=generator, device=canvas.device))
        return torch.where(to_generate, noise, canvas)

    def denoise(self, logits):
        out = logits.float()
        if self.mask_id is None:
            return out
        out = out.clone() if out is logits else out
        out[..., self.mask_id] = float("-inf")  # x_theta never predicts [MASK]
        return out

    # ------------------------------------------------------------------------------------ the reverse step
    def reverse_probs(self, probs, z, t, s):
        """q(z_s | z_t = z, x_theta) (module docstring), (n, V) float64; s = 0 gives the posterior of x."""
        probs = probs.double()
        a_t, a_s = self.masses(t.double())[0], self.masses(s.double())[0]
        noise_t, noise_s = self.noise_probs(t), self.noise_probs(s)  # (n, V)
        q_s = a_s[:, None] * probs + noise_s  # q_s(. | x_theta)
        a_ts = a_t / a_s
        g = noise_t.gather(1, z[:, None]) - a_ts[:, None] * noise_s.gather(1, z[:, None])  # (n, 1)
        out = g.clamp(min=0) * q_s
        out.scatter_add_(1, z[:, None], a_ts[:, None] * q_s.gather(1, z[:, None]))
        total = out.sum(-1, keepdim=True)
        stay = torch.zeros_like(out).scatter_(1, z[:, None], 1.0)  # a zero-probability row keeps its token
        return torch.where(total > 0, out / total.clamp(min=1e-300), stay)

    # ------------------------------------------------------------------------------------ the bound
    def terms(self, logits: torch.Tensor, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-position NELBO integrands (N,) (module docstring): logits (N, V) raw at positions with clean token
        x (N,), noised token z (N,), time t (N,)."""
        logp = F.log_softmax(self.denoise(logits), -1)  # (N, V) log x_theta, -inf at [MASK]
        alpha, m, u = (v.float() for v in self.masses(t.double()))
        rho_m, rho_u = (v.float() for v in self.rates(t.double()))
        un = u / self.states  # u_t / N: beta_t pi_t at a non-mask token
        lun, la = un.log(), alpha.log()
        d = -F.softplus(la[:, None] + logp - lun[:, None])  # (N, V): log(u/N) - log b_y; 0 at [MASK]
        d_x = d.gather(1, x[:, None]).squeeze(1)
        log_b_x = lun - d_x
        a_x = alpha + un
        log_ratio_x = a_x.log() - log_b_x  # log(a_x / b_x)
        kl = a_x * log_ratio_x + un * (d.sum(-1) - d_x)
        at_x, at_m = z == x, (z == self.mask_id) if self.mask_id is not None else torch.zeros_like(z, dtype=torch.bool)
        log_ratio = torch.where(at_x, log_ratio_x, d.gather(1, z[:, None]).squeeze(1))  # log(a_z / b_z)
        itakura = torch.where(at_m, 0.0, log_ratio.exp() - log_ratio - 1.0)
        weight = torch.where(at_m, rho_m / m.clamp(min=1e-30),
                             torch.where(at_x, (rho_u / self.states) / a_x, rho_u / u.clamp(min=1e-30)))
        return weight * (kl + itakura).clamp(min=0.0)

    def loss(self, network, batch: dict, generator=None, t: torch.Tensor | None = None,
             always: bool = False) -> LossOutput:
        """The NELBO per scored token of one batch at times t (B,) (antithetic draws unless given). Random draws:
        t, z_t (u1, u2), then the self-conditioning coin (only when 0 < p < 1). Given positions are neither
        noised nor scored (the process contract). always: feed self-conditioning without a coin (evaluation)."""
        batch = self.honour_given(batch)
        x, loss_mask = batch["input_ids"], batch["loss_mask"]
        if t is None:
            t = antithetic_times(x.shape[0], self.sampling_eps, generator, x.device, self.antithetic)
        t = t.clamp(max=self.t_max)
        z = self.add_noise(x, t, loss_mask, generator)
        inputs_embeds = second_pass_inputs(self, network, batch, z, t, generator, always)
        logits = self.forward_logits(network, z, t, batch, inputs_embeds, logits_at=loss_mask)  # (N, V)
        rows = loss_mask.nonzero()[:, 0]  # (N,): the row of each scored position
        terms = self.terms(logits, x[loss_mask], z[loss_mask], t[rows]) + self.prior_kl()  # (N,)
        total, num_tokens = terms.sum(), loss_mask.sum()
        per_row = torch.zeros(x.shape[0], device=x.device, dtype=terms.dtype).index_add_(0, rows, terms.detach())
        return LossOutput(total / num_tokens.clamp(min=1), total.detach(), num_tokens.detach(), per_row,
                          loss_mask.sum(1))

    @torch.no_grad()
    def nelbo(self, network, batch: dict, num_t_samples: int, generator) -> LossOutput:
        """Monte Carlo NELBO with `num_t_samples` antithetic times per sequence; generator: one, or one per row.
        Self-conditioning (when on) is fed at every time."""
        batch = self.honour_given(batch)
        x = batch["input_ids"]
        times = evaluation_times((x.shape[0],), num_t_samples, self.sampling_eps, generator, x.device)  # (B, n)
        nll_sum = torch.zeros((), device=x.device, dtype=torch.float64)
        per_row = torch.zeros(x.shape[0], device=x.device, dtype=torch.float64)
        for j in range(num_t_samples):
            out = self.loss(network, batch, generator, t=times[:, j], always=True)
            nll_sum += out.nll_sum.double()
            per_row += out.nll_per_row.double()
        num_tokens = batch["loss_mask"].sum()
        return LossOutput(nll_sum / num_t_samples / num_tokens.clamp(min=1), nll_sum / num_t_samples, num_tokens,
                          per_row / num_t_samples, batch["loss_mask"].sum(1))

    # ------------------------------------------------------------------------------------ self-conditioning
    def sc_feedback(self) -> SelfConditioningFeedback:
        return SelfConditioningFeedback(self.self_conditioner, self.mask_id, acts_on="generated", rescale=True)

    def loss_feedback(self, generator, device, always: bool = False):
        if self.p_sc <= 0:
            return None
        use = always or coin(generator, device, self.p_sc)
        if not always:
            self.last_applied = use
        return self.sc_feedback() if use else None

    def feedback(self, **overrides):
        if self.p_sc <= 0:
            return super().feedback(**overrides)
        if overrides:
            raise ValueError(f"self-conditioning takes no sampling options (got {', '.join(sorted(overrides))})")
        return self.sc_feedback()

    def log_values(self) -> dict[str, float]:
        return {"self_conditioning/applied": float(self.last_applied)} if self.p_sc > 0 else {}


@register_process
class UniformDiffusion(InterpolatingDiffusion):
    """UDLM: uniform-state diffusion over the non-[MASK] tokens (module docstring)."""

    name, corruption, config_class = "udlm", "uniform", UniformConfig

    def __init__(self, schedule, mask_id, vocab_size, **kw):
        super().__init__(mask_id, vocab_size, **kw)
        self.schedule = schedule

    @classmethod
    def from_config(cls, cfg, description):
        return cls(make_schedule(cfg.schedule, cfg.eps), description.mask_id, description.vocab_size,
                   sampling_eps=cfg.sampling_eps, antithetic=cfg.antithetic,
                   time_conditioning=description.time_conditioning, self_conditioning=cfg.self_conditioning,
                   d_model=description.d_model)

    @classmethod
    def check_config(cls, cfg) -> None:
        p = cfg.process
        if p.schedule not in SCHEDULES:
            raise ValueError(f"unknown process.schedule '{p.schedule}'; valid: {', '.join(SCHEDULES)}")
        if not 0.0 < p.eps < 1.0:
            raise ValueError(f"process.eps={p.eps} must be in (0, 1): alpha_1 = eps, and alpha_t > 0 keeps the "
                             "uniform rate -alpha'/(N alpha) finite")
        check_interpolating(p)

    def masses(self, t):
        alpha = self.schedule.alpha(t)
        return alpha, torch.zeros_like(alpha), 1.0 - alpha

    def rates(self, t):
        alpha = self.schedule.alpha(t)
        return torch.zeros_like(alpha), -self.schedule.dalpha(t) / alpha

    def prior_kl(self) -> float:
        a1 = float(self.schedule.alpha(torch.tensor(1.0, dtype=torch.float64)))
        n, un = self.states, (1.0 - a1) / self.states
        return (a1 + un) * math.log(n * (a1 + un)) + (n - 1) * un * math.log(n * un)


@register_process
class GIDDiffusion(InterpolatingDiffusion):
    """GIDD's mix: [MASK] and uniform noise, the uniform share p_u at t = 1/2 (module docstring)."""

    name, corruption, config_class = "gidd", "mixed", GIDDConfig

    def __init__(self, mask_id, vocab_size, p_u: float = 0.2, gamma: float = 1.0, **kw):
        if mask_id is None:
            raise ValueError("process 'gidd' needs a [MASK] token (its prior is all [MASK])")
        super().__init__(mask_id, vocab_size, **kw)
        self.p_u, self.gamma = p_u, gamma
        self.bump = 2.0 ** gamma * p_u / (1.0 - p_u)  # B
        self.t_max = 1.0 - self.sampling_eps

    @classmethod
    def from_config(cls, cfg, description):
        return cls(description.mask_id, description.vocab_size, cfg.p_u, cfg.gamma, sampling_eps=cfg.sampling_eps,
                   antithetic=cfg.antithetic, time_conditioning=description.time_conditioning,
                   self_conditioning=cfg.self_conditioning, d_model=description.d_model)

    @classmethod
    def check_config(cls, cfg) -> None:
        p = cfg.process
        if not 0.0 < p.p_u < 1.0:
            raise ValueError(f"process.p_u={p.p_u} must be in (0, 1) (p_u = 0 is MDLM: use process=mdlm)")
        if not 0.0 < p.gamma <= 2.0:
            raise ValueError(f"process.gamma={p.gamma} must be in (0, 2] (beyond 2 the forward rates turn negative)")
        check_interpolating(p)

    def masses(self, t):
        t = t.clamp(0.0, 1.0)
        c = self.bump * (t * (1.0 - t)).clamp(min=0.0) ** (self.gamma / 2)
        total = 1.0 + c
        return (1.0 - t) / total, t / total, c / total

    def rates(self, t):
        t = t.clamp(1e-12, 1.0 - 1e-12)
        c = self.bump * (t * (1.0 - t)) ** (self.gamma / 2)
        total = 1.0 + c
        return 1.0 / (total * (1.0 - t)), c * ((self.gamma / 2) * (1.0 - 2.0 * t) + t) / (t * (1.0 - t) * total)
