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

import torch

from dlm.process.clipped_schedule import time_of_mask_rate
from dlm.process.mdlm import subs_logits
from dlm.sampler.base import (InputFeedback, SampleOutput, Sampler, Timer, check_sampling_args, masked_fraction,
                              sample_tokens)


class FirstHittingSampler(Sampler):
    name = "first_hitting"

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, feedback: InputFeedback | None = None):
        check_sampling_args(temperature, top_p)
        self.temperature, self.top_p, self.feedback = temperature, top_p, feedback

    @torch.no_grad()
    def sample(self, network, process, canvas, fixed=None, generator=None, record_trajectory=False) -> SampleOutput:
        mask_id, schedule = process.mask_id, process.schedule
        z = canvas.clone()
        fixed = (z != mask_id) if fixed is None else fixed
        B, L = z.shape
        rows = torch.arange(B, device=z.device)
        t = torch.ones(B, dtype=torch.float64)
        nfe, embeds, trajectory = 0, None, []
        with Timer() as timer:
            while True:
                open_ = (z == mask_id) & ~fixed  # (B, L)
                n_open = open_.sum(1)  # (B,)
                if not n_open.any():
                    break
                if process.time_conditioning:  # the next hitting time: mask rate (1 - alpha_t) * u^(1/n)
                    u_time = torch.rand(B, generator=generator, device=z.device, dtype=torch.float64).cpu()
                    rate = (1.0 - schedule.alpha(t)) * u_time ** (1.0 / n_open.clamp(min=1).double().cpu())
                    t = torch.where(n_open.cpu() > 0, time_of_mask_rate(schedule, rate), t)
                raw = process.forward_logits(network, z, t.float().to(z.device), {}, inputs_embeds=embeds)  # (B, L, V)
                nfe += 1
                # A uniformly random open position per row (argmax of uniform scores over the open ones).
                scores = torch.rand(B, L, generator=generator, device=z.device).masked_fill(~open_, -1.0)
                pos = scores.argmax(1)  # (B,)
                u_token = torch.rand(B, generator=generator, device=z.device, dtype=torch.float64)
                logits = subs_logits(raw[rows, pos], mask_id)  # (B, V)
                new = sample_tokens(logits, u_token, self.temperature, self.top_p)
                active = n_open > 0
                z[rows[active], pos[active]] = new[active]
                if self.feedback is not None:
                    masks_left = masked_fraction(z, mask_id, ~fixed)  # (B,)
                    embeds = self.feedback(network, z, raw, fixed, masks_left)
                if record_trajectory:
                    trajectory.append(z.clone())
        return SampleOutput(z, nfe, timer.seconds, trajectory)
