"""The ancestral sampler of interpolating processes: each step draws z_s from the process's closed-form reverse
step p(z_s | z_t) = q(z_s | z_t, x_theta) (`process.reverse_probs`), for uniform-state models (UDLM), GIDD's mix of
[MASK] and uniform noise, and absorbing ones (where it is MDLM's ancestral rule).

Times 1 = t_0 > t_1 > ... > t_T = sampling_eps. Step i < T of a row: one network call on z at t_i, x_theta =
softmax(denoise(logits) / temperature) (nucleus-filtered with top_p < 1), and every position to generate draws
z_{t_{i+1}} from q(. | z_t, x_theta) (float64, inverse CDF; a uniform or mixed process may change any such token,
an absorbing one only its [MASK] positions). The final step T calls the network at t_T and takes the argmax of
the posterior of x, q(z_0 | z_t, x_theta) (UDLM's and MDLM's final denoising; an absorbing row with no [MASK]
left skips it). NFE: T + 1 per row (an absorbing row stops as soon as nothing is masked).

Events: `committed` marks the positions whose token changed at the step, `confidence` x_theta's probability of
the new token. With `feedback=` (self-conditioning, soft-masking) each call is fed the previous call's
prediction; `masks_left` is the fraction still masked for an absorbing process, the noise level 1 - alpha_s of
the next call otherwise. Per-row generators: a row's draws depend on its own state only (the step-level API).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.sampler.base import InputFeedback, Sampler, StepEvent, chosen_probability, masked_fraction, sample_tokens
from dlm.sampler.registry import SamplingConfig, register_sampler
from dlm.sampler.state import SamplerState


@dataclass
class UniformAncestralConfig(SamplingConfig):
    feedback: InputFeedback | None = None  # self-conditioning / soft-masking (DiffusionLM.generate attaches it)


def x_theta_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(n, V) float64 probabilities of x_theta logits (n, V) at a temperature (0: the argmax's one-hot), nucleus
    filtered (top_p < 1: the smallest set of tokens reaching top_p, renormalised)."""
    if temperature == 0:
        return torch.zeros_like(logits, dtype=torch.float64).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    probs = torch.softmax(logits.double() / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p  # the top token is always kept
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@register_sampler("uniform_ancestral", UniformAncestralConfig,
                  description="the ancestral posterior q(z_s | z_t, x_theta) of uniform-state (UDLM), GIDD-mix and "
                              "absorbing models: any generated token may change until the final argmax")
class UniformAncestralSampler(Sampler):
    name = "uniform_ancestral"
    corruptions = ("uniform", "mixed", "absorbing")
    takes_feedback = True

    def times(self, process) -> torch.Tensor:
        """(steps + 1,) float64 from 1 down to the process's sampling_eps."""
        return torch.linspace(1.0, getattr(process, "sampling_eps", 1e-3), self.steps + 1, dtype=torch.float64)

    @torch.no_grad()
    def start(self, network, process, canvas, generator=None) -> SamplerState:
        process.check_sampler(self)
        no = torch.zeros(canvas.tokens.shape[0], dtype=torch.bool, device=canvas.tokens.device)
        return SamplerState.begin(network, process, canvas, generator, self.steps + 1, {"embeds": None, "fed": no})

    def movable(self, state: SamplerState) -> torch.Tensor:
        """(B, L) bool: the positions a step may change."""
        if state.process.corruption == "absorbing":
            return state.process.is_noise(state.tokens) & state.to_generate
        return state.to_generate

    @torch.no_grad()
    def step(self, state: SamplerState) -> tuple[SamplerState, StepEvent]:
        """Step i < steps of each row not done: t_i -> t_{i+1}; step `steps`: the final argmax (then done)."""
        network, process, z = state.network, state.process, state.tokens
        times = self.times(process)
        B, L = z.shape
        device = z.device
        idx, active = state.step, ~state.done
        movable = self.movable(state)
        need = active & movable.any(1)  # rows that call the network
        final = need & (idx >= self.steps)
        committed = torch.zeros(B, L, dtype=torch.bool, device=device)
        confidence = torch.zeros(B, L, device=device) if state.confidence else None
        embeds, fed = state.extras["embeds"], state.extras["fed"]
        rows = need.nonzero().squeeze(1)
        if rows.numel():
            i = idx.clamp(max=self.steps).cpu()
            t = times[i].float().to(device)  # (B,) each row's own time
            s = torch.where(final.cpu(), 0.0, times[(i + 1).clamp(max=self.steps)]).to(device)  # (B,) float64
            raw = state.forward(rows, t, embeds, fed)  # (B_a, L, V)
            pos = movable[rows]  # (B_a, L)
            row_of = pos.nonzero()[:, 0]  # (n,) index into rows
            logits = process.denoise(raw[pos])  # (n, V)
            old = z[rows][pos]  # (n,)
            rev = process.reverse_probs(x_theta_probs(logits, self.temperature, self.top_p), old,
                                        t.double()[rows][row_of], s[rows][row_of])  # (n, V) float64
            u = state.rand(rows, (L,), torch.float64, per_position=True)[pos]  # (n,) each row its own draws
            drawn = sample_tokens(rev.clamp(min=0).log(), u)
            new = torch.where(final[rows][row_of], rev.argmax(-1), drawn)
            block = z[rows]
            block[pos] = new
            z[rows] = block
            changed = torch.zeros_like(pos)
            changed[pos] = new != old
            committed[rows] = changed
            if confidence is not None:
                part = torch.zeros(pos.shape, device=device)
                part[pos] = chosen_probability(logits, new)
                confidence[rows] = part * changed
            moving = rows[~final[rows]]  # rows whose next call reads this step's prediction
            if self.feedback is not None and moving.numel():
                keep = ~final[rows]
                if process.corruption == "absorbing":
                    left = masked_fraction(process, z[moving], state.to_generate[moving])
                else:
                    left = (1.0 - process.alpha(s[moving])).float()
                new_embeds = self.feedback(network, z[moving], raw[keep], ~state.to_generate[moving], left)
                if new_embeds is not None:
                    embeds = new_embeds.new_zeros((B, L, new_embeds.shape[-1])) if embeds is None else embeds
                    embeds[moving] = new_embeds.to(embeds.dtype)
                    fed = fed.clone()
                    fed[moving] = True
        state.step = idx + active.long()
        left = self.movable(state).any(1)
        state.done = state.done | final | (active & ~need) | \
            (active & ~left if process.corruption == "absorbing" else torch.zeros_like(active))
        state.extras = {"embeds": embeds, "fed": fed}
        event = StepEvent(state.events, z, committed, confidence, state.calls, state.nfe_per_row.clone())
        state.events += 1
        return state, event
