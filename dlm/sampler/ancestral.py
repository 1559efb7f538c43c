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

from dlm.sampler.base import (Canvas, InputFeedback, Sampler, StepEvent, chosen_probability, forward_live, forward_rows,
                              generators_of, masked_fraction, rand_rows, sample_tokens)
from dlm.sampler.state import SamplerState
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

    def times(self, process) -> tuple[torch.Tensor, torch.Tensor]:
        """Times (steps + 1,) float64 from 1 down to sampling_eps, and alpha at each."""
        times = torch.linspace(1.0, getattr(process, "sampling_eps", 1e-3), self.steps + 1, dtype=torch.float64)
        return times, process.alpha(times)

    @torch.no_grad()
    def start(self, network, process, canvas: Canvas, generator=None) -> SamplerState:
        process.check_sampler(self)
        if self.cache and process.time_conditioning:
            raise ValueError("the cached ancestral sampler needs a model without time conditioning "
                             "(x_theta must depend on z only); use cache=False")
        no = torch.zeros(canvas.tokens.shape[0], dtype=torch.bool, device=canvas.tokens.device)
        return SamplerState.begin(network, process, canvas, generator, self.steps + 1,  # + the final argmax
                                  {"raw": None, "fresh": no, "embeds": None, "fed": no.clone()})

    @torch.no_grad()
    def step(self, state: SamplerState) -> tuple[SamplerState, StepEvent]:
        """Step i < steps of a row: t_i -> t_{i+1}; step `steps`: the final argmax of the masks left (then done).
        A row's network call is skipped when cached logits are still valid for it (cache, no feedback)."""
        network, process, z = state.network, state.process, state.tokens
        times, alphas = self.times(process)
        B, L = z.shape
        device = z.device
        idx = state.step
        active = ~state.done
        final = active & (idx >= self.steps)  # the final argmax
        noise = process.is_noise(z) & state.to_generate  # (B, L)
        extras = state.extras
        raw, fresh, embeds, fed = extras["raw"], extras["fresh"], extras["embeds"], extras["fed"]
        need = active & (~final | noise.any(1))  # rows that compute this step (a final step with masks left)
        if self.cache and self.feedback is None:
            need &= ~fresh  # the cached sampler reuses logits still valid for the row's canvas
        if bool(need.any()):
            t = times[idx.clamp(max=self.steps).cpu()].float().to(device)  # (B,) each row's own time
            inputs = embeds
            if embeds is not None and not bool(fed[need].all()):  # a row without feedback yet is fed its tokens
                inputs = torch.where(fed[:, None, None], embeds, network.embed_tokens(z).to(embeds.dtype))
            if raw is None or bool(need.all()):
                raw = forward_live(process, network, z, t, inputs, need, state.canvas())
            else:  # only the rows that need it, written in place: no second (B, L, V) tensor per step
                rows = need.nonzero().squeeze(1)
                raw[rows] = forward_rows(process, network, z, t, inputs, rows, state.canvas()).to(raw.dtype)
            fresh = fresh | need
            state.calls += 1
            state.nfe_per_row += need.cpu()
            state.tokens_computed += need.cpu() * L
        move = active & ~final
        i = idx.clamp(max=self.steps - 1).cpu()
        p_unmask = ((alphas[i + 1] - alphas[i]) / (1.0 - alphas[i])).float().to(device)  # (B,)
        u_unmask = torch.zeros(B, L, device=device)
        u_token = torch.zeros(B, L, device=device, dtype=torch.float64)
        if bool(move.any()):
            rows = move.nonzero().squeeze(1)
            gens = generators_of(state.generators, rows)
            valid = None if state.key_valid is None else state.key_valid[rows]
            u_unmask[rows] = rand_rows(gens, (rows.numel(), L), device, valid=valid)
            u_token[rows] = rand_rows(gens, (rows.numel(), L), device, torch.float64, valid)
        unmask = noise & (u_unmask < p_unmask[:, None]) & move[:, None]  # (B, L)
        last = noise & final[:, None]  # the final argmax's positions
        committed = unmask | last
        confidence = torch.zeros(z.shape, device=device) if state.confidence else None
        if bool(unmask.any()):  # x_theta only where it is drawn from: (n, V) rows, not the whole (B, L, V)
            x_theta = process.denoise(raw[unmask])
            tokens = sample_tokens(x_theta, u_token[unmask], self.temperature, self.top_p)
            z[unmask] = tokens
            if confidence is not None:
                confidence[unmask] = chosen_probability(x_theta, tokens)
        if bool(last.any()):
            x_theta = process.denoise(raw[last])
            tokens = x_theta.argmax(-1)
            z[last] = tokens
            if confidence is not None:
                confidence[last] = chosen_probability(x_theta, tokens)
        if self.feedback is not None and bool(move.any()):
            rows = move.nonzero().squeeze(1)
            masks_left = masked_fraction(process, z[rows], state.to_generate[rows])  # (B_a,)
            new = self.feedback(network, z[rows], raw[rows], ~state.to_generate[rows], masks_left)
            if new is not None:
                embeds = new.new_zeros((B, L, new.shape[-1])) if embeds is None else embeds
                embeds[rows] = new.to(embeds.dtype)
                fed = fed | move
        fresh = fresh & ~committed.any(1)  # z changed: a cache must call the network again
        state.step = idx + active.long()
        state.done = state.done | final | (active & (state.step >= self.steps) & ~(process.is_noise(z) &
                                                                                  state.to_generate).any(1))
        state.extras = {"raw": raw, "fresh": fresh, "embeds": embeds, "fed": fed}
        event = StepEvent(state.events, z, committed, confidence, state.calls, state.nfe_per_row.clone())
        state.events += 1
        return state, event
