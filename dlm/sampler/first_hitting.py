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

from dlm.sampler.base import (Canvas, InputFeedback, SampleOutput, Sampler, StepReporter, chosen_probability,
                              forward_live, masked_fraction, rand_rows, sample_tokens)
from dlm.sampler.registry import check_temperature, check_top_p, register_sampler


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

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, feedback: InputFeedback | None = None):
        FirstHittingConfig(temperature, top_p)  # validates
        self.temperature, self.top_p, self.feedback = temperature, top_p, feedback

    def with_steps(self, steps: int) -> "FirstHittingSampler":
        return self  # one token per step: the number of steps is the number of masks

    @torch.no_grad()
    def sample(self, network, process, canvas: Canvas, generator=None, callback=None) -> SampleOutput:
        process.check_sampler(self)
        z, to_generate = canvas.tokens.clone(), canvas.to_generate
        fixed = ~to_generate
        B, L = z.shape
        rows = torch.arange(B, device=z.device)
        t = torch.ones(B, dtype=torch.float64)
        steps = StepReporter(B, callback, z.shape[1])
        embeds = None
        while not steps.all_stopped:
            live = steps.live(z.device)
            open_ = process.is_noise(z) & to_generate & live[:, None]  # (B, L)
            n_open = open_.sum(1)  # (B,)
            if not n_open.any():
                break
            if process.time_conditioning:  # the next hitting time: mask rate (1 - alpha_t) * u^(1/n)
                u_time = rand_rows(generator, (B,), z.device, torch.float64).cpu()
                rate = (1.0 - process.alpha(t)) * u_time ** (1.0 / n_open.clamp(min=1).double().cpu())
                t = torch.where(n_open.cpu() > 0, process.time_of_mask_rate(rate), t)
            raw = forward_live(process, network, z, t.float().to(z.device), embeds, live, canvas)  # (B, L, V)
            steps.called()
            # A uniformly random open position per row (argmax of uniform scores over the open ones).
            scores = rand_rows(generator, (B, L), z.device, valid=canvas.key_valid).masked_fill(~open_, -1.0)
            pos = scores.argmax(1)  # (B,)
            u_token = rand_rows(generator, (B,), z.device, torch.float64)
            logits = process.denoise(raw[rows, pos])  # (B, V)
            new = sample_tokens(logits, u_token, self.temperature, self.top_p)
            active = n_open > 0
            z[rows[active], pos[active]] = new[active]
            if self.feedback is not None:
                masks_left = masked_fraction(process, z, to_generate)  # (B,)
                embeds = self.feedback(network, z, raw, fixed, masks_left)
            committed = torch.zeros(B, L, dtype=torch.bool, device=z.device)
            committed[rows[active], pos[active]] = True
            confidence = None
            if callback is not None:
                confidence = torch.zeros(B, L, device=z.device)
                confidence[rows[active], pos[active]] = chosen_probability(logits[active], new[active])
            steps.report(z, committed, confidence)
        return steps.output(z)
