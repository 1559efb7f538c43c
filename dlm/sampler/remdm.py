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

import torch

from dlm.process.mdlm import subs_logits
from dlm.sampler.base import (InputFeedback, SampleOutput, Sampler, Timer, check_sampling_args, fill_remaining_masks,
                              masked_fraction, sample_tokens)

STRATEGIES = ("cap", "rescale", "conf", "loop")
DEFAULT_ETA = {"cap": 0.008, "rescale": 0.015, "conf": 0.0, "loop": 0.02}


class ReMDMSampler(Sampler):
    name = "remdm"

    def __init__(self, steps: int = 128, strategy: str = "cap", eta: float | None = None, t_on: float = 0.55,
                 t_off: float = 0.05, alpha_on: float = 0.9, temperature: float = 1.0, top_p: float = 1.0,
                 feedback: InputFeedback | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown ReMDM strategy '{strategy}'; valid: {', '.join(STRATEGIES)}")
        if steps < 1:
            raise ValueError(f"steps={steps} must be a positive integer")
        eta = DEFAULT_ETA[strategy] if eta is None else eta
        if strategy == "conf" and eta != 0.0:
            raise ValueError("ReMDM-conf takes no eta (its sigma is spread by confidence); leave eta unset")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"ReMDM eta={eta} must be in [0, 1] (a remasking probability, or a fraction of sigma_max)")
        if strategy == "loop":
            if not 0.0 < t_off < t_on < 1.0:
                raise ValueError(f"ReMDM-loop needs 0 < t_off < t_on < 1, got t_off={t_off}, t_on={t_on}")
            if not 0.0 < alpha_on < 1.0:
                raise ValueError(f"ReMDM-loop alpha_on={alpha_on} must be in (0, 1)")
            if steps < 3:
                raise ValueError(f"ReMDM-loop needs steps >= 3 (one per phase), got {steps}")
        check_sampling_args(temperature, top_p)
        self.steps, self.strategy, self.eta = steps, strategy, eta
        self.t_on, self.t_off, self.alpha_on = t_on, t_off, alpha_on
        self.temperature, self.top_p = temperature, top_p
        self.feedback = feedback

    def time_grid(self, process) -> tuple[torch.Tensor, torch.Tensor]:
        """Network times (steps + 1,) float64 from 1 down to sampling_eps, and which steps remask (steps,) bool."""
        eps = process.sampling_eps
        if self.strategy != "loop":
            times = torch.linspace(1.0, eps, self.steps + 1, dtype=torch.float64)
            return times, torch.ones(self.steps, dtype=torch.bool)
        tau_on = _time_of_alpha(process.schedule, self.alpha_on, eps)
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
    def sample(self, network, process, canvas, fixed=None, generator=None, record_trajectory=False) -> SampleOutput:
        mask_id = process.mask_id
        z = canvas.clone()
        fixed = (z != mask_id) if fixed is None else fixed
        times, remask_steps = self.time_grid(process)
        alphas = process.schedule.alpha(times)
        B = z.shape[0]
        confidence = torch.ones(z.shape, device=z.device)  # (B, L) probability of each token when it was decoded
        nfe, embeds, trajectory = 0, None, []
        with Timer() as timer:
            for i in range(self.steps):
                t = torch.full((B,), float(times[i]), device=z.device)
                raw = process.forward_logits(network, z, t, {}, inputs_embeds=embeds)  # (B, L, V)
                nfe += 1
                alpha_t, alpha_s = float(alphas[i]), float(alphas[i + 1])
                masked = z == mask_id
                decoded = ~masked & ~fixed
                if remask_steps[i]:
                    sigma = self.sigma(alpha_t, alpha_s, decoded, confidence).to(z.device)
                    if self.strategy == "conf":
                        sigma_masked = torch.zeros_like(sigma)  # conf spreads sigma over decoded tokens only
                    else:
                        sigma_masked = sigma
                else:
                    sigma = sigma_masked = torch.zeros((), device=z.device)
                p_unmask = ((alpha_s - (1.0 - sigma_masked) * alpha_t) / (1.0 - alpha_t)).clamp(0.0, 1.0)
                u_unmask = torch.rand(z.shape, generator=generator, device=z.device)
                u_token = torch.rand(z.shape, generator=generator, device=z.device, dtype=torch.float64)
                u_remask = torch.rand(z.shape, generator=generator, device=z.device)
                unmask = masked & ~fixed & (u_unmask < p_unmask)  # (B, L)
                remask = decoded & (u_remask < sigma)  # (B, L); fixed positions are never in `decoded`
                if unmask.any():
                    rows = subs_logits(raw[unmask], mask_id)  # (N, V): x_theta only where it is drawn from
                    tokens = sample_tokens(rows, u_token[unmask], self.temperature, self.top_p)
                    z[unmask] = tokens
                    if self.strategy == "conf":
                        confidence[unmask] = rows.softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
                z[remask] = mask_id
                embeds = None
                if self.feedback is not None:
                    masks_left = masked_fraction(z, mask_id, ~fixed)  # (B,)
                    embeds = self.feedback(network, z, raw, fixed, masks_left)
                    if embeds is not None and remask.any():
                        embeds[remask] = network.embed.weight[mask_id].to(embeds.dtype)
                if record_trajectory:
                    trajectory.append(z.clone())
            if (z == mask_id).any():
                nfe += fill_remaining_masks(network, process, z, float(times[-1]), embeds)
                if record_trajectory:
                    trajectory.append(z.clone())
        return SampleOutput(z, nfe, timer.seconds, trajectory)


def _time_of_alpha(schedule, alpha: float, t_min: float) -> float:
    """The time tau in [t_min, 1] with schedule.alpha(tau) = alpha (alpha decreases in t), by bisection."""
    lo, hi = torch.tensor(t_min, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    if not float(schedule.alpha(hi)) <= alpha <= float(schedule.alpha(lo)):
        raise ValueError(f"ReMDM-loop alpha_on={alpha} is outside the schedule's range "
                         f"[{float(schedule.alpha(hi)):.4g}, {float(schedule.alpha(lo)):.4g}]")
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(schedule.alpha(mid)) > alpha:
            lo = mid
        else:
            hi = mid
    return float((lo + hi) / 2)
