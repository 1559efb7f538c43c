"""Score samplers (SEDD, Lou, Meng, Ermon 2024, arXiv 2310.16834, sampling.py): Euler and Tweedie τ-leaping.

They sample any process with a score parameterisation (`process.log_score(logits, z, t)`, `total_noise(t)`,
`noise_rate(t)`: SEDD's own, or MDLM / BD3-LM's through RADD), over its graph (`process.corruption`: absorbing or
uniform). Times 1 = t_0 > t_1 > ... > t_T = eps (linspace). Step i (t = t_i, s = t_{i+1}) at every position to
generate, from the log-scores of one network call at t:
  euler:   x -> y ≠ x with probability (t - s) σ'(t) Q(x, y) s_y, stay with the rest (dlm/process/score_graphs.py);
  tweedie: SEDD's "analytic" step, the staggered score exp(-Δσ Q) s times exp(Δσ Q)[·, x], Δσ = σ̄(t) - σ̄(s)
           (on an MDLM with RADD scores: exactly MDLM's ancestral step).
Then a final denoising step at t = eps, Tweedie with Δσ = σ̄(eps) with the [MASK] column dropped (absorbing), so
no mask is left. Given positions never change (they are not drawn); draws are float64 inverse CDF, one uniform per
position from each row's generator (`state.rand`). An absorbing row with no mask left is done early. cache=true
(a model without time conditioning): a row whose canvas did not change since its last call reuses its logits and
takes no call, with the same tokens for a seed (the random draws do not depend on it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.process.score_graphs import euler_probs, sample_probs, tweedie_probs
from dlm.sampler.base import Canvas, InputFeedback, Sampler, StepEvent, masked_fraction
from dlm.sampler.registry import check_steps, register_sampler
from dlm.sampler.state import SamplerState


@dataclass
class ScoreConfig:
    steps: int = 128
    eps: float = 1e-5  # the time grid's end (SEDD samples from 1 to 1e-5)
    denoise: bool = True  # the final denoising step (absorbing: without it masks may be left)
    cache: bool = False  # reuse the last logits of a row whose canvas did not change (no time conditioning)
    feedback: InputFeedback | None = None  # soft-masking, self-conditioning: the next call's inputs

    def __post_init__(self):
        check_steps(self.steps)
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps={self.eps!r} must be in (0, 1): the last time of the grid 1 -> eps")


class ScoreSampler(Sampler):
    """The loop both score samplers share; `update` (euler or tweedie) is the step's rule."""

    corruptions = ("absorbing", "uniform")
    takes_feedback = True
    update = "tweedie"

    def times(self) -> torch.Tensor:
        return torch.linspace(1.0, self.eps, self.steps + 1, dtype=torch.float64)

    @torch.no_grad()
    def start(self, network, process, canvas: Canvas, generator=None) -> SamplerState:
        process.check_sampler(self)
        process.noise_rate(torch.ones(1, dtype=torch.float64))  # a process without scores is refused here, uncalled
        if self.cache and process.time_conditioning:
            raise ValueError(f"sampler '{self.name}' with cache=true needs a model without time conditioning (its "
                             "logits must depend on the canvas only); use cache=false")
        no = torch.zeros(canvas.tokens.shape[0], dtype=torch.bool, device=canvas.tokens.device)
        state = SamplerState.begin(network, process, canvas, generator, self.steps + int(self.denoise),
                                   {"embeds": None, "fed": no, "raw": None, "fresh": no.clone()})
        todo = state.to_generate  # nothing to generate (absorbing: no mask left to fill): done
        if process.corruption == "absorbing":
            todo = todo & process.is_noise(state.tokens)
        state.done = ~todo.any(1)
        return state

    @torch.no_grad()
    def step(self, state: SamplerState) -> tuple[SamplerState, StepEvent]:
        """Step i < steps of each row not done: one update from t_i to t_{i+1}; step `steps`: the final denoising."""
        process, z = state.process, state.tokens
        B, L = z.shape
        device = z.device
        times = self.times()
        rows = (~state.done).nonzero().squeeze(1)  # (B_a,)
        idx = state.step[rows].cpu()
        final = idx >= self.steps  # (B_a,) the rows at their final denoising step
        t_now = times[idx.clamp(max=self.steps)]
        t_next = times[(idx + 1).clamp(max=self.steps)]
        t_all = torch.zeros(B, dtype=torch.float64)
        t_all[rows.cpu()] = t_now
        embeds, fed, cached, fresh = (state.extras[k] for k in ("embeds", "fed", "raw", "fresh"))
        if self.cache and self.feedback is None:  # a row whose canvas is unchanged since its last call reuses it
            need = rows[~fresh[rows]]
            if need.numel():
                new_raw = state.forward(need, t_all.float().to(device), embeds, fed)  # (B_n, L, V)
                cached = new_raw.new_zeros((B, L, new_raw.shape[-1])) if cached is None else cached
                cached[need] = new_raw.to(cached.dtype)
            raw = cached[rows]
        else:
            raw = state.forward(rows, t_all.float().to(device), embeds, fed)  # (B_a, L, V)
        zr = z[rows]
        log_s = process.log_score(raw, zr, t_now.float().to(device))  # (B_a, L, V)
        absorbing = process.corruption == "absorbing"
        movable = state.to_generate[rows] & (process.is_noise(zr) if absorbing else True)  # (B_a, L)
        u = state.rand(rows, (L,), torch.float64, per_position=True)  # (B_a, L)
        sigma_now, sigma_next = process.total_noise(t_now), process.total_noise(t_next)  # (B_a,) float64
        dsigma = torch.where(final, sigma_now, sigma_now - sigma_next)  # final: all the way to σ̄ = 0
        if self.update == "euler":
            rate = (t_now - t_next) * process.noise_rate(t_now)  # (B_a,) Δt σ'(t)
        pos = movable.nonzero(as_tuple=True)
        new = zr.clone()
        confidence = torch.zeros(B, L, device=device) if state.confidence else None
        if pos[0].numel():
            at = pos[0].cpu()
            x = zr[pos]
            fin = final[at].to(device)
            d = dsigma[at].to(device)
            scores = log_s[pos]  # (N, V)
            if self.update == "euler":
                probs = euler_probs(process.corruption, scores, x, rate[at].to(device), process.mask_id)
            else:
                probs = tweedie_probs(process.corruption, scores, x, d, process.mask_id)
            if bool(fin.any()) and (self.update == "euler" or absorbing):  # the final denoising: Tweedie (SEDD's),
                f = fin.nonzero().squeeze(1)  # the [MASK] column dropped
                probs[f] = tweedie_probs(process.corruption, scores[f], x[f], d[f], process.mask_id, absorbing)
            drawn = sample_probs(probs, u[pos], x)
            new[pos] = drawn
            if confidence is not None:
                chosen = probs.gather(-1, drawn[:, None]).squeeze(-1) / probs.sum(-1).clamp_min(1e-30)
                full = torch.zeros(rows.numel(), L, device=device)
                full[pos] = chosen.float()
                confidence[rows] = full
        committed = torch.zeros(B, L, dtype=torch.bool, device=device)
        committed[rows] = new != zr
        z[rows] = new
        if self.cache and self.feedback is None:
            fresh = fresh.clone()
            fresh[rows] = ~committed[rows].any(1)  # a changed canvas needs a new call
            state.extras = {**state.extras, "raw": cached, "fresh": fresh}
        if confidence is not None:
            confidence = confidence * committed
        if self.feedback is not None:  # the next call's inputs from this call's prediction (as first_hitting)
            if absorbing:
                left = masked_fraction(process, z[rows], state.to_generate[rows])  # (B_a,)
            else:  # no noise to count: the expected share of moved tokens at the next time
                left = (-torch.expm1(-sigma_next)).float().to(device)
            given = self.feedback(state.network, z[rows], raw, ~state.to_generate[rows], left)
            if given is None:
                fed = fed.clone()
                fed[rows] = False
            else:
                embeds = given.new_zeros((B, L, given.shape[-1])) if embeds is None else embeds
                embeds[rows] = given.to(embeds.dtype)
                fed = fed.clone()
                fed[rows] = True
            state.extras = {**state.extras, "embeds": embeds, "fed": fed}
        state.step[rows] += 1
        state.done = state.done | (state.step >= state.num_steps)
        if absorbing:
            state.done = state.done | ~(process.is_noise(z) & state.to_generate).any(1)
        event = StepEvent(state.events, z, committed, confidence, state.calls, state.nfe_per_row.clone())
        state.events += 1
        return state, event


@register_sampler("euler", ScoreConfig,
                  description="SEDD's Euler sampler: reverse rates from the model's scores, a final denoising step")
class EulerSampler(ScoreSampler):
    name = "euler"
    update = "euler"


@register_sampler("tweedie", ScoreConfig, aliases=("analytic",),
                  description="SEDD's Tweedie tau-leaping (\"analytic\"): the staggered score times the transposed "
                              "transition; on MDLM its ancestral step")
class TweedieSampler(ScoreSampler):
    name = "tweedie"
    update = "tweedie"
