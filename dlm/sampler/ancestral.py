"""MDLM's ancestral sampler ("ddpm") and its cached variant ("ddpm_cache").

Times 1 = t_0 > t_1 > ... > t_T = eps. In a step t -> s, a masked position becomes a token drawn from x_theta
with probability (alpha_s - alpha_t) / (1 - alpha_t), else stays masked; clean positions never change
(SUBS carry-over). After the last step every remaining mask takes the argmax of x_theta.

Cached: without time conditioning x_theta depends only on z, so when a step commits no token the previous
logits are reused and the network is not called. Both variants draw the same random numbers in the same
order, so for one seed they return identical tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.sampler.base import (Canvas, InputFeedback, SampleOutput, Sampler, StepReporter, chosen_probability,
                              fill_remaining_masks, forward_live, masked_fraction, rand_rows,
                              sample_tokens)
from dlm.sampler.registry import SamplingConfig, register_sampler


@dataclass
class AncestralConfig(SamplingConfig):
    cache: bool = False  # reuse the last logits when a step committed nothing (no time conditioning)
    feedback: InputFeedback | None = None  # soft-masking


@register_sampler("ancestral_cache", AncestralConfig, aliases=("ddpm_cache",), defaults={"cache": True},
                  description="MDLM's ancestral sampler, skipping the network call of steps that commit nothing")
@register_sampler("ancestral", AncestralConfig, aliases=("ddpm",),
                  description="MDLM's ancestral sampler: each step unmasks each [MASK] with the schedule's probability")
class AncestralSampler(Sampler):
    name = "ancestral"
    takes_feedback = True

    def __init__(self, steps: int = 128, temperature: float = 1.0, top_p: float = 1.0, cache: bool = False,
                 feedback: InputFeedback | None = None):
        AncestralConfig(steps, temperature, top_p)  # validates
        self.steps, self.temperature, self.top_p, self.cache = steps, temperature, top_p, cache
        self.feedback = feedback  # e.g. soft-masking: the next call sees embeddings built from these logits

    @torch.no_grad()
    def sample(self, network, process, canvas: Canvas, generator=None, callback=None) -> SampleOutput:
        process.check_sampler(self)
        if self.cache and process.time_conditioning:
            raise ValueError("the cached ancestral sampler needs a model without time conditioning "
                             "(x_theta must depend on z only); use cache=False")
        z, to_generate = canvas.tokens.clone(), canvas.to_generate
        fixed = ~to_generate
        times = torch.linspace(1.0, getattr(process, "sampling_eps", 1e-3), self.steps + 1, dtype=torch.float64)
        alphas = process.alpha(times)
        B = z.shape[0]
        steps = StepReporter(B, callback)
        raw, embeds = None, None
        for i in range(self.steps):
            live = steps.live(z.device)
            t = torch.full((B,), float(times[i]), device=z.device)
            called = raw is None or not self.cache or self.feedback is not None
            if called:
                raw = forward_live(process, network, z, t, embeds, live, canvas)  # (B, L, V)
                steps.called()
            p_unmask = float((alphas[i + 1] - alphas[i]) / (1.0 - alphas[i]))
            u_unmask = rand_rows(generator, z.shape, z.device, valid=canvas.key_valid)
            u_token = rand_rows(generator, z.shape, z.device, torch.float64, canvas.key_valid)
            unmask = process.is_noise(z) & to_generate & (u_unmask < p_unmask) & live[:, None]  # (B, L)
            committed = bool(unmask.any())
            confidence = None
            if committed:  # x_theta only where it is drawn from: (n, V) rows, not the whole (B, L, V)
                x_theta = process.denoise(raw[unmask])
                tokens = sample_tokens(x_theta, u_token[unmask], self.temperature, self.top_p)
                z[unmask] = tokens
                if callback is not None:
                    confidence = torch.zeros(z.shape, device=z.device)
                    confidence[unmask] = chosen_probability(x_theta, tokens)
            if self.feedback is not None:
                masks_left = masked_fraction(process, z, to_generate)  # (B,)
                embeds = self.feedback(network, z, raw, fixed, masks_left)
            if committed:
                raw = None  # z changed: a cache must call the network again
            steps.report(z, unmask, confidence)
            if steps.all_stopped:
                break
        if not steps.all_stopped:
            reusable = raw if self.cache and self.feedback is None else None
            fill_remaining_masks(network, process, z, to_generate, float(times[-1]), steps, embeds, reusable, canvas=canvas)
        return steps.output(z)
