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

from dlm.sampler.base import (Canvas, InputFeedback, Sampler, StepEvent, chosen_probability,
                              masked_fraction, sample_tokens)
from dlm.sampler.registry import SamplingConfig, register_sampler
from dlm.sampler.state import SamplerState

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
        if self.eta is None:
            self.eta = DEFAULT_ETA[self.strategy]  # the strategy's published value
        eta = self.eta
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
    def start(self, network, process, canvas: Canvas, generator=None) -> SamplerState:
        process.check_sampler(self)
        self.time_grid(process)  # refuses an alpha_on the schedule never reaches before the first step
        B, device = canvas.tokens.shape[0], canvas.tokens.device
        no = torch.zeros(B, dtype=torch.bool, device=device)
        confidence = torch.ones(canvas.tokens.shape, device=device)  # (B, L) each token's probability when decoded
        return SamplerState.begin(network, process, canvas, generator, self.steps + 1,  # + the final argmax
                                  {"confidence": confidence, "embeds": None, "fed": no})

    def rates(self, alphas: torch.Tensor, remasks: bool, i: int, decoded: torch.Tensor, confidence: torch.Tensor):
        """Step i's (sigma, p_unmask) for rows (B_a, L) at that step (alphas: the grid's (steps + 1,); remasks:
        whether step i remasks): sigma the remasking probability of a decoded token, p_unmask the unmasking
        probability of a mask; each a 0-dim tensor, or (B_a, L) for conf."""
        alpha_t, alpha_s = float(alphas[i]), float(alphas[i + 1])
        if remasks:
            sigma = self.sigma(alpha_t, alpha_s, decoded, confidence).to(decoded.device)
            sigma_masked = torch.zeros_like(sigma) if self.strategy == "conf" else sigma  # conf: decoded tokens only
        else:
            sigma = sigma_masked = torch.zeros((), device=decoded.device)
        return sigma, ((alpha_s - (1.0 - sigma_masked) * alpha_t) / (1.0 - alpha_t)).clamp(0.0, 1.0)

    @torch.no_grad()
    def step(self, state: SamplerState) -> tuple[SamplerState, StepEvent]:
        """Step i < steps of a row: t_i -> t_{i+1} (unmask, remask); step `steps`: the final argmax of the masks
        left (then done). Rows at the same step share the schedule's numbers; each draws from its own generator."""
        network, process, z = state.network, state.process, state.tokens
        times, remask_steps = self.time_grid(process)
        alphas = process.alpha(times)
        B, L = z.shape
        device = z.device
        idx = state.step
        active = ~state.done
        final = active & (idx >= self.steps)  # the final argmax (only rows with masks left are not done there)
        move = active & ~final
        rows = active.nonzero().squeeze(1)  # (B_a,) the rows of this call
        conf, embeds, fed = state.extras["confidence"], state.extras["embeds"], state.extras["fed"]
        t = times[idx.clamp(max=self.steps).cpu()].float().to(device)  # (B,) each row's own time
        raw = state.forward(rows, t, embeds, fed)  # (B_a, L, V)
        at = torch.full((B,), -1, dtype=torch.long, device=device)
        at[rows] = torch.arange(rows.numel(), device=device)  # batch row -> its row of raw

        def x_theta_at(where: torch.Tensor) -> torch.Tensor:  # (N, V) at the positions where (B, L), row-major
            b, l = where.nonzero().unbind(1)
            return process.denoise(raw[at[b], l])

        masked = process.is_noise(z)
        decoded = ~masked & state.to_generate
        sigma = torch.zeros(B, L, device=device)
        p_unmask = torch.zeros(B, L, device=device)
        for i in idx[move].unique().tolist():  # rows at step i share alpha_t, alpha_s (conf: sigma per row)
            group = move & (idx == i)
            s, p = self.rates(alphas, bool(remask_steps[i]), i, decoded[group], conf[group])
            sigma[group], p_unmask[group] = s, p
        u_unmask = torch.zeros(B, L, device=device)
        u_token = torch.zeros(B, L, device=device, dtype=torch.float64)
        u_remask = torch.zeros(B, L, device=device)
        moving = move.nonzero().squeeze(1)
        if moving.numel():
            u_unmask[moving] = state.rand(moving, (L,), per_position=True)
            u_token[moving] = state.rand(moving, (L,), torch.float64, per_position=True)
            u_remask[moving] = state.rand(moving, (L,), per_position=True)
        unmask = masked & state.to_generate & (u_unmask < p_unmask) & move[:, None]  # (B, L)
        remask = decoded & (u_remask < sigma) & move[:, None]  # (B, L); fixed positions are never in `decoded`
        last = masked & state.to_generate & final[:, None]  # the final argmax's positions
        confidence = torch.zeros(z.shape, device=device) if state.confidence else None
        if bool(unmask.any()):
            x_theta = x_theta_at(unmask)  # (N, V): x_theta only where it is drawn from
            tokens = sample_tokens(x_theta, u_token[unmask], self.temperature, self.top_p)
            z[unmask] = tokens
            if self.strategy == "conf":
                conf[unmask] = x_theta.softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
            if confidence is not None:
                confidence[unmask] = chosen_probability(x_theta, tokens)
        if bool(last.any()):
            x_theta = x_theta_at(last)
            tokens = x_theta.argmax(-1)
            z[last] = tokens
            if confidence is not None:
                confidence[last] = x_theta.softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
        z[remask] = process.mask_id
        if self.feedback is not None and moving.numel():
            feed = at[moving]
            masks_left = masked_fraction(process, z[moving], state.to_generate[moving])  # (B_a,)
            given = self.feedback(network, z[moving], raw[feed], ~state.to_generate[moving], masks_left)
            if given is None:  # plain tokens next time
                fed = fed & ~move
            else:
                if bool(remask.any()):  # a position remasked now gets plain E[m]
                    given[remask[moving]] = network.embed.weight[process.mask_id].to(given.dtype)
                if moving.numel() == B:
                    embeds = given
                else:
                    embeds = given.new_zeros((B, L, given.shape[-1])) if embeds is None else embeds
                    embeds[moving] = given.to(embeds.dtype)
                fed = fed | move
        state.step = idx + active.long()
        state.done = state.done | final | (active & (state.step >= self.steps) &
                                           ~(process.is_noise(z) & state.to_generate).any(1))
        state.extras = {"confidence": conf, "embeds": embeds, "fed": fed}
        committed = unmask | last
        if not bool(committed.any()):
            confidence = None  # nothing committed, nothing to report
        event = StepEvent(state.events, z, committed, confidence, state.calls, state.nfe_per_row.clone())
        state.events += 1
        return state, event


def _time_of_alpha(process, alpha: float, t_min: float) -> float:
    """The time tau in [t_min, 1] with alpha(tau) = alpha (alpha decreases in t)."""
    lo, hi = torch.tensor(t_min, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    if not float(process.alpha(hi)) <= alpha <= float(process.alpha(lo)):
        raise ValueError(f"ReMDM-loop alpha_on={alpha} is outside the schedule's range "
                         f"[{float(process.alpha(hi)):.4g}, {float(process.alpha(lo)):.4g}]")
    return max(t_min, float(process.time_of_mask_rate(1.0 - alpha)))
