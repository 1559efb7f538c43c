"""ReMDM: remasking samplers for masked diffusion (Wang, Schiff, Sahoo, Kuleshov 2025, arXiv 2503.00307).

MDLM's sampler never revisits a decoded token. ReMDM's reverse step t -> s lets it: with sigma_t in
[0, sigma_max], sigma_max = min(1, (1 - alpha_s) / alpha_t),
  decoded position:  stays with prob 1 - sigma_t, becomes [MASK] with prob sigma_t;
  masked position:   becomes a token drawn from x_theta with prob (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t),
                     else stays masked.
sigma_t = 0 is MDLM's ancestral step. Strategies (published defaults):
  cap      sigma_t = min(eta, sigma_max), eta = 0.008
  rescale  sigma_t = eta * sigma_max, eta = 0.015
  conf     sigma_t^l = sigma_max * softmax_l(-psi^l) over the decoded positions, psi^l the probability the token
           had when it was decoded: unconfident tokens are remasked first (masked positions unmask as in MDLM)
  loop     MDLM from t = 1 until alpha reaches alpha_on = 0.9 at t_on = 0.55; then alpha held at alpha_on and
           sigma_t = min(eta, sigma_max), eta = 0.02, until t_off = 0.05; then MDLM to the end. Steps are split
           over the three phases in proportion to their lengths in t.
Fixed positions (prompt, infill context) are never remasked. After the last step every remaining mask takes
the argmax of x_theta, so the output has no masks. With `feedback=` (soft-masking), every position that stays
masked gets this step's soft embedding; a position remasked in this step gets plain E[m] (the network's
output at a clean input position is not trained to be a prediction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.sampler.base import (Canvas, InputFeedback, SampleOutput, Sampler, StepReporter, chosen_probability,
                              fill_remaining_masks, forward_live, masked_fraction, rand_rows,
                              sample_tokens)
from dlm.sampler.registry import SamplingConfig, register_sampler

STRATEGIES = ("cap", "rescale", "conf", "loop")
DEFAULT_ETA = {"cap": 0.008, "rescale": 0.015, "conf": 0.0, "loop": 0.02}


@dataclass
class ReMDMConfig(SamplingConfig):
    strategy: str = "cap"
    eta: float | None = None  # default: the strategy's published value
    t_on: float = 0.55
    t_off: float = 0.05
    alpha_on: float = 0.9
    feedback: InputFeedback | None = None  # soft-masking

    def __post_init__(self):
        super().__post_init__()
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown ReMDM strategy '{self.strategy}'; valid: {', '.join(STRATEGIES)}")
        eta = DEFAULT_ETA[self.strategy] if self.eta is None else self.eta
        if self.strategy == "conf" and eta != 0.0:
            raise ValueError("ReMDM-conf takes no eta (its sigma is spread by confidence); leave eta unset")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"ReMDM eta={eta} must be in [0, 1] (a remasking probability, or a fraction of sigma_max)")
        if self.strategy == "loop":
            if not 0.0 < self.t_off < self.t_on < 1.0:
                raise ValueError(f"ReMDM-loop needs 0 < t_off < t_on < 1, got t_off={self.t_off}, t_on={self.t_on}")
            if not 0.0 < self.alpha_on < 1.0:
                raise ValueError(f"ReMDM-loop alpha_on={self.alpha_on} must be in (0, 1)")
            if self.steps < 3:
                raise ValueError(f"ReMDM-loop needs steps >= 3 (one per phase), got {self.steps}")


_DESCRIPTIONS = {"cap": "sigma = min(eta, sigma_max)", "rescale": "sigma = eta * sigma_max",
                 "conf": "unconfident tokens are remasked first",
                 "loop": "MDLM, then a remasking loop at fixed alpha, then MDLM"}


def _register_strategies(cls):
    for strategy in STRATEGIES:
        register_sampler(f"remdm_{strategy}", ReMDMConfig, defaults={"strategy": strategy},
                         description=f"ReMDM remasking ({_DESCRIPTIONS[strategy]})")(cls)
    return cls


@_register_strategies
class ReMDMSampler(Sampler):
    name = "remdm"
    takes_feedback = True

    def __init__(self, steps: int = 128, strategy: str = "cap", eta: float | None = None, t_on: float = 0.55,
                 t_off: float = 0.05, alpha_on: float = 0.9, temperature: float = 1.0, top_p: float = 1.0,
                 feedback: InputFeedback | None = None):
        ReMDMConfig(steps, temperature, top_p, strategy, eta, t_on, t_off, alpha_on)  # validates
        eta = DEFAULT_ETA[strategy] if eta is None else eta
        self.steps, self.strategy, self.eta = steps, strategy, eta
        self.t_on, self.t_off, self.alpha_on = t_on, t_off, alpha_on
        self.temperature, self.top_p = temperature, top_p
        self.feedback = feedback

    def with_steps(self, steps: int) -> "ReMDMSampler":
        ReMDMConfig(steps, self.temperature, self.top_p, self.strategy, self.eta, self.t_on, self.t_off, self.alpha_on)
        return super().with_steps(steps)

    def time_grid(self, process) -> tuple[torch.Tensor, torch.Tensor]:
        """Network times (steps + 1,) float64 from 1 down to sampling_eps, and which steps remask (steps,) bool."""
        eps = getattr(process, "sampling_eps", 1e-3)
        if self.strategy != "loop":
            times = torch.linspace(1.0, eps, self.steps + 1, dtype=torch.float64)
            return times, torch.ones(self.steps, dtype=torch.bool)
        tau_on = _time_of_alpha(process, self.alpha_on, eps)
        n1 = min(max(1, round(self.steps * (1.0 - self.t_on))), self.steps - 2)  # each phase gets >= 1 step
        n2 = max(1, min(self.steps - n1 - 1, round(self.steps * (self.t_on - self.t_off))))
        n3 = self.steps - n1 - n2
        times = torch.cat((torch.linspace(1.0, tau_on, n1 + 1, dtype=torch.float64),
                           torch.full((n2,), tau_on, dtype=torch.float64),
                           torch.linspace(tau_on, eps, n3 + 1, dtype=torch.float64)[1:]))
        remask = torch.zeros(self.steps, dtype=torch.bool)
        remask[n1:n1 + n2] = True
        return times, remask

    def sigma(self, alpha_t: float, alpha_s: float, decoded: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """Remasking probability sigma_t, a 0-dim tensor or (B, L) for conf."""
        sigma_max = min(1.0, (1.0 - alpha_s) / alpha_t) if alpha_t > 0 else 1.0
        if self.strategy in ("cap", "loop"):
            return torch.tensor(min(self.eta, sigma_max))
        if self.strategy == "rescale":
            return torch.tensor(self.eta * sigma_max)
        scores = torch.where(decoded, -confidence, float("-inf"))  # (B, L)
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with nothing decoded give 0
        return sigma_max * weights

    @torch.no_grad()
    def sample(self, network, process, canvas: Canvas, generator=None, callback=None) -> SampleOutput:
        process.check_sampler(self)
        z, to_generate = canvas.tokens.clone(), canvas.to_generate
        fixed = ~to_generate
        times, remask_steps = self.time_grid(process)
        alphas = process.alpha(times)
        B = z.shape[0]
        confidence = torch.ones(z.shape, device=z.device)  # (B, L) probability of each token when it was decoded
        steps = StepReporter(B, callback, z.shape[1])
        embeds = None
        for i in range(self.steps):
            live = steps.live(z.device)
            t = torch.full((B,), float(times[i]), device=z.device)
            raw = forward_live(process, network, z, t, embeds, live, canvas)  # (B, L, V)
            steps.called()
            alpha_t, alpha_s = float(alphas[i]), float(alphas[i + 1])
            masked = process.is_noise(z)
            decoded = ~masked & to_generate
            if remask_steps[i]:
                sigma = self.sigma(alpha_t, alpha_s, decoded, confidence).to(z.device)
                if self.strategy == "conf":
                    sigma_masked = torch.zeros_like(sigma)  # conf spreads sigma over decoded tokens only
                else:
                    sigma_masked = sigma
            else:
                sigma = sigma_masked = torch.zeros((), device=z.device)
            p_unmask = ((alpha_s - (1.0 - sigma_masked) * alpha_t) / (1.0 - alpha_t)).clamp(0.0, 1.0)
            u_unmask = rand_rows(generator, z.shape, z.device, valid=canvas.key_valid)
            u_token = rand_rows(generator, z.shape, z.device, torch.float64, canvas.key_valid)
            u_remask = rand_rows(generator, z.shape, z.device, valid=canvas.key_valid)
            unmask = masked & to_generate & (u_unmask < p_unmask) & live[:, None]  # (B, L)
            remask = decoded & (u_remask < sigma) & live[:, None]  # (B, L); fixed positions are never in `decoded`
            step_conf = None
            if unmask.any():
                rows = process.denoise(raw[unmask])  # (N, V): x_theta only where it is drawn from
                tokens = sample_tokens(rows, u_token[unmask], self.temperature, self.top_p)
                z[unmask] = tokens
                if self.strategy == "conf":
                    confidence[unmask] = rows.softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
                if callback is not None:
                    step_conf = torch.zeros(z.shape, device=z.device)
                    step_conf[unmask] = chosen_probability(rows, tokens)
            z[remask] = process.mask_id
            embeds = None
            if self.feedback is not None:
                masks_left = masked_fraction(process, z, to_generate)  # (B,)
                embeds = self.feedback(network, z, raw, fixed, masks_left)
                if embeds is not None and remask.any():
                    embeds[remask] = network.embed.weight[process.mask_id].to(embeds.dtype)
            steps.report(z, unmask, step_conf)
            if steps.all_stopped:
                break
        if not steps.all_stopped:
            fill_remaining_masks(network, process, z, to_generate, float(times[-1]), steps, embeds, canvas=canvas)
        return steps.output(z)


def _time_of_alpha(process, alpha: float, t_min: float) -> float:
    """The time tau in [t_min, 1] with alpha(tau) = alpha (alpha decreases in t)."""
    lo, hi = torch.tensor(t_min, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    if not float(process.alpha(hi)) <= alpha <= float(process.alpha(lo)):
        raise ValueError(f"ReMDM-loop alpha_on={alpha} is outside the schedule's range "
                         f"[{float(process.alpha(hi)):.4g}, {float(process.alpha(lo)):.4g}]")
    return max(t_min, float(process.time_of_mask_rate(1.0 - alpha)))
