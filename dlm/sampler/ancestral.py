"""MDLM's ancestral sampler ("ddpm") and its cached variant ("ddpm_cache").

Times 1 = t_0 > t_1 > ... > t_T = eps. In a step t -> s, a masked position becomes a token drawn from x_theta
with probability (alpha_s - alpha_t) / (1 - alpha_t), else stays masked; clean positions never change
(SUBS carry-over). After the last step every remaining mask takes the argmax of x_theta.

Cached: without time conditioning x_theta depends only on z, so when a step commits no token the previous
logits are reused and the network is not called. Both variants draw the same random numbers in the same
order, so for one seed they return identical tokens.
"""

from __future__ import annotations

import torch

from dlm.process.mdlm import subs_logits
from dlm.sampler.base import (InputFeedback, SampleOutput, Sampler, Timer, check_sampling_args, fill_remaining_masks,
                              masked_fraction, sample_tokens)


class AncestralSampler(Sampler):
    name = "ancestral"

    def __init__(self, steps: int = 128, temperature: float = 1.0, top_p: float = 1.0, cache: bool = False,
                 feedback: InputFeedback | None = None):
        if steps < 1:
            raise ValueError(f"steps={steps} must be a positive integer")
        check_sampling_args(temperature, top_p)
        self.steps, self.temperature, self.top_p, self.cache = steps, temperature, top_p, cache
        self.feedback = feedback  # e.g. soft-masking: the next call sees embeddings built from these logits

    @torch.no_grad()
    def sample(self, network, process, canvas, fixed=None, generator=None, record_trajectory=False) -> SampleOutput:
        if self.cache and process.time_conditioning:
            raise ValueError("the cached ancestral sampler needs a model without time conditioning "
                             "(x_theta must depend on z only); use cache=False")
        mask_id, schedule = process.mask_id, process.schedule
        z = canvas.clone()
        fixed = (z != mask_id) if fixed is None else fixed
        times = torch.linspace(1.0, process.sampling_eps, self.steps + 1, dtype=torch.float64)
        alphas = schedule.alpha(times)
        B = z.shape[0]
        nfe, raw, embeds, trajectory = 0, None, None, []
        with Timer() as timer:
            for i in range(self.steps):
                t = torch.full((B,), float(times[i]), device=z.device)
                if raw is None or not self.cache or self.feedback is not None:
                    raw = process.forward_logits(network, z, t, {}, inputs_embeds=embeds)  # (B, L, V)
                    nfe += 1
                p_unmask = float((alphas[i + 1] - alphas[i]) / (1.0 - alphas[i]))
                u_unmask = torch.rand(z.shape, generator=generator, device=z.device)
                u_token = torch.rand(z.shape, generator=generator, device=z.device, dtype=torch.float64)
                unmask = (z == mask_id) & ~fixed & (u_unmask < p_unmask)  # (B, L)
                committed = bool(unmask.any())
                if committed:  # x_theta only where it is drawn from: (n, V) rows, not the whole (B, L, V)
                    x_theta = subs_logits(raw[unmask], mask_id)
                    z[unmask] = sample_tokens(x_theta, u_token[unmask], self.temperature, self.top_p)
                if self.feedback is not None:
                    masks_left = masked_fraction(z, mask_id, ~fixed)  # (B,)
                    embeds = self.feedback(network, z, raw, fixed, masks_left)
                if committed:
                    raw = None  # z changed: a cache must call the network again
                if record_trajectory:
                    trajectory.append(z.clone())
            if (z == mask_id).any():
                reusable = raw if self.cache and self.feedback is None else None
                nfe += fill_remaining_masks(network, process, z, float(times[-1]), embeds, reusable)
                if record_trajectory:
                    trajectory.append(z.clone())
        return SampleOutput(z, nfe, timer.seconds, trajectory)
