"""The first-hitting sampler: exactly one token per step (Zheng et al. 2024, arXiv 2409.02908, section 4).

In masked diffusion each masked token unmasks at an independent time, so with n masks left at time t the time of
the NEXT unmask ("first hitting") has a closed form: the mask rate at that time is (1 - alpha_t) * u^(1/n),
u ~ U(0, 1). At that time one of the n masked positions, uniformly chosen, takes a token drawn from x_theta. This
simulates the same reverse process as the ancestral sampler without ever spending a step that commits nothing, so
the number of network calls equals the number of generated tokens. Times only matter to time-conditioned
networks, so they are computed only for those (without time conditioning x_theta depends on z alone, and the
process reduces to: unmask a uniformly random masked position, drawing its token from x_theta).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.sampler.base import (Canvas, InputFeedback, Sampler, StepEvent, chosen_probability,
                              masked_fraction, sample_tokens)
from dlm.sampler.registry import check_temperature, check_top_p, register_sampler
from dlm.sampler.state import SamplerState


@dataclass
class FirstHittingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    feedback: InputFeedback | None = None  # soft-masking

    def __post_init__(self):
        check_temperature(self.temperature)
        check_top_p(self.top_p)


@register_sampler("first_hitting", FirstHittingConfig,
                  description="one token per network call at the exact next unmasking time (no step budget)")
class FirstHittingSampler(Sampler):
    name = "first_hitting"
    takes_feedback = True

    def with_steps(self, steps: int) -> "FirstHittingSampler":
        return self  # one token per step: the number of steps is the number of masks

    @torch.no_grad()
    def start(self, network, process, canvas: Canvas, generator=None) -> SamplerState:
        """Every row at time 1, with one step per position left to generate (a row with none is done)."""
        process.check_sampler(self)
        z = canvas.tokens
        open_ = (process.is_noise(z) & canvas.to_generate).sum(1)  # (B,): its number of steps
        no = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        state = SamplerState.begin(network, process, canvas, generator, 0,
                                   {"t": torch.ones(z.shape[0], dtype=torch.float64), "embeds": None, "fed": no})
        state.num_steps, state.done = open_, open_ == 0
        return state

    @torch.no_grad()
    def step(self, state: SamplerState) -> tuple[SamplerState, StepEvent]:
        """One token per row not done: at the row's next hitting time, a uniformly random masked position takes
        a token drawn from x_theta."""
        network, process, z = state.network, state.process, state.tokens
        B, L = z.shape
        active = ~state.done
        rows = active.nonzero().squeeze(1)  # (B_a,)
        open_ = process.is_noise(z[rows]) & state.to_generate[rows]  # (B_a, L)
        t, embeds, fed = state.extras["t"], state.extras["embeds"], state.extras["fed"]
        if process.time_conditioning:  # the next hitting time: mask rate (1 - alpha_t) * u^(1/n)
            u = state.rand(rows, (), torch.float64).cpu()
            n = open_.sum(1).double().cpu()
            rate = (1.0 - process.alpha(t[rows.cpu()])) * u ** (1.0 / n)
            t = t.clone()
            t[rows.cpu()] = process.time_of_mask_rate(rate)
        raw = state.forward(rows, t.float().to(z.device), embeds, fed)  # (B_a, L, V)
        # A uniformly random open position per row (argmax of uniform scores over the open ones).
        scores = state.rand(rows, (L,), per_position=True).masked_fill(~open_, -1.0)
        pos = scores.argmax(1)  # (B_a,)
        u_token = state.rand(rows, (), torch.float64)
        a = torch.arange(rows.numel(), device=z.device)
        logits = process.denoise(raw[a, pos])  # (B_a, V)
        new = sample_tokens(logits, u_token, self.temperature, self.top_p)
        z[rows, pos] = new
        if self.feedback is not None:
            masks_left = masked_fraction(process, z[rows], state.to_generate[rows])  # (B_a,)
            given = self.feedback(network, z[rows], raw, ~state.to_generate[rows], masks_left)
            if given is None:  # plain tokens next time
                fed = fed & ~active
            elif rows.numel() == B:
                embeds, fed = given, fed | active
            else:
                embeds = given.new_zeros((B, L, given.shape[-1])) if embeds is None else embeds
                embeds[rows] = given.to(embeds.dtype)
                fed = fed | active
        committed = torch.zeros(B, L, dtype=torch.bool, device=z.device)
        committed[rows, pos] = True
        confidence = None
        if state.confidence:
            confidence = torch.zeros(B, L, device=z.device)
            confidence[rows, pos] = chosen_probability(logits, new)
        state.step = state.step + active.long()
        state.done = state.done | ~(process.is_noise(z) & state.to_generate).any(1)
        state.extras = {"t": t, "embeds": embeds, "fed": fed}
        event = StepEvent(state.events, z, committed, confidence, state.calls, state.nfe_per_row.clone())
        state.events += 1
        return state, event
