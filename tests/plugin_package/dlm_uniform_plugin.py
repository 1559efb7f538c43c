"""A package outside dlm, written only against dlm's docs (docs/architecture.md): a uniform-state process and a
DiffusionGemma-style renoising sampler, registered through the `dlm.plugins` entry point. It is a test of the
plugin path (tests/test_plugins.py installs it in a temporary folder), not a library feature.

plugin_uniform_x0: each scored token is replaced, with probability t ~ U[eps, 1], by a token drawn uniformly from the
whole vocabulary; the network predicts the clean token x0 at every position (it cannot tell which were replaced)
and the loss is the cross-entropy -log p_theta(x0 | z_t) averaged over scored tokens. That reconstruction loss is
not a bound on the NLL, so the process declares likelihood = "estimate".

plugin_renoise: start from uniform noise; at step n of N predict x0 everywhere, draw a candidate canvas at a temperature
falling from t_max to t_min, keep the ceil(G (n+1)/N) generated positions of lowest predictive entropy (G: the
positions to generate) and redraw every other generated position uniformly, so the renoised fraction falls to 0
at the last step (nothing stays committed between steps: acceptance is recomputed over the whole canvas).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlm.process.base import LossOutput, Process, ProcessConfig, register_process
from dlm.sampler.base import Sampler, StepEvent, forward_live, generators_of, rand_rows, sample_tokens
from dlm.sampler.state import SamplerState
from dlm.sampler.registry import register_sampler


# ------------------------------------------------------------------------------------------ the process
@dataclass
class UniformConfig(ProcessConfig):
    name: str = "plugin_uniform_x0"
    eps: float = 1e-3  # t ~ U[eps, 1]: the probability that a token is replaced


@register_process
class UniformX0(Process):
    """Uniform-state corruption with an x0-prediction cross-entropy (see the module docstring)."""

    name, corruption, config_class = "plugin_uniform_x0", "uniform", UniformConfig
    likelihood = "estimate"
    default_sampler = "plugin_renoise"

    def __init__(self, eps: float, mask_id: int | None = None, time_conditioning: bool = False):
        super().__init__(mask_id, time_conditioning)
        self.eps = eps

    @classmethod
    def from_config(cls, cfg, description):
        if description.vocab_size < 2:
            raise ValueError("plugin_uniform_x0 needs the model's vocabulary size (ModelDescription.vocab_size)")
        return cls(cfg.eps, description.mask_id, description.time_conditioning)

    @classmethod
    def check_config(cls, cfg) -> None:
        if not 0.0 <= cfg.process.eps < 1.0:
            raise ValueError(f"process.eps={cfg.process.eps} must be in [0, 1)")

    def alpha(self, t):
        return 1.0 - torch.as_tensor(t)  # the probability that a token is still the clean one's draw

    def time_of_mask_rate(self, rate):
        return torch.as_tensor(rate, dtype=torch.float64)

    def draws(self, shape, generator, device):
        """t (B,), u (B, L), noise (B, L): from one generator, or from one per row (a row's draws are its own)."""
        B, L = shape
        V = self.vocab_size
        if isinstance(generator, (list, tuple)):
            parts = [self.draws((1, L), g, device) for g in generator]
            return tuple(torch.cat(p) for p in zip(*parts))
        t = self.eps + (1.0 - self.eps) * torch.rand(B, generator=generator, device=device)
        u = torch.rand(B, L, generator=generator, device=device)
        noise = torch.randint(V, (B, L), generator=generator, device=device)
        return t, u, noise

    def loss(self, network, batch, generator=None) -> LossOutput:
        batch = self.honour_given(batch)  # given positions: neither noised nor scored (the process contract)
        x, loss_mask = batch["input_ids"], batch["loss_mask"]
        t, u, noise = self.draws(x.shape, generator, x.device)
        z = torch.where((u < t[:, None]) & loss_mask, noise, x)  # (B, L)
        logits = self.denoise(self.forward_logits(network, z, t, batch))  # (B, L, V)
        ce = F.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="none").view_as(x)
        per_row = torch.where(loss_mask, ce, 0.0).sum(1)  # (B,)
        total, num_tokens = per_row.sum(), loss_mask.sum()
        return LossOutput(total / num_tokens.clamp(min=1), total.detach(), num_tokens.detach(), per_row.detach(),
                          loss_mask.sum(1))

    @torch.no_grad()
    def nelbo(self, network, batch, num_t_samples, generator) -> LossOutput:
        """The Monte Carlo mean over `num_t_samples` draws of t of the reconstruction loss (an estimate)."""
        batch = self.honour_given(batch)
        per_row = torch.zeros(batch["input_ids"].shape[0], dtype=torch.float64)
        for _ in range(num_t_samples):
            per_row += self.loss(network, batch, generator).nll_per_row.double().cpu()
        per_row /= num_t_samples
        tokens = batch["loss_mask"].sum(1)
        return LossOutput(per_row.sum() / tokens.sum().clamp(min=1), per_row.sum(), tokens.sum(), per_row, tokens)


# ------------------------------------------------------------------------------------------ the sampler
@dataclass
class RenoiseConfig:
    steps: int = 16
    t_max: float = 0.8  # sampling temperature at the first step
    t_min: float = 0.4  # ... and at the last

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r} must be a positive integer")
        if not 0.0 < self.t_min <= self.t_max:
            raise ValueError(f"need 0 < t_min <= t_max, got t_min={self.t_min}, t_max={self.t_max}")


@register_sampler("plugin_renoise", RenoiseConfig,
                  description="DiffusionGemma-style: predict x0, keep the lowest-entropy tokens, renoise the rest")
class Renoise(Sampler):
    """Renoising sampler for uniform-state processes (see the module docstring)."""

    corruptions = ("uniform",)

    @torch.no_grad()
    def start(self, network, process, canvas, generator=None) -> SamplerState:
        """The step-level API (docs/architecture.md): one row per request, each with its own step and generator."""
        process.check_sampler(self)
        return SamplerState.begin(network, process, canvas, generator, self.steps)

    @torch.no_grad()
    def step(self, state: SamplerState) -> tuple[SamplerState, StepEvent]:
        """Step n of each live row: predict x0, draw a candidate canvas, keep the lowest-entropy positions, renoise
        the rest uniformly. Every random number comes from `rand_rows` (one generator per row)."""
        network, process, z, gen = state.network, state.process, state.tokens, state.to_generate
        B, L = z.shape
        device, V = z.device, process.vocab_size
        live = ~state.done  # (B,)
        n = state.step.clamp(max=self.steps - 1)  # (B,) each row's own step
        left = (self.steps - 1 - n).double() / max(self.steps - 1, 1)  # 1 at the first step, 0 at the last
        temperature = (self.t_min + (self.t_max - self.t_min) * left).float()  # (B,)
        t = left.clamp(min=1e-3).float()  # the noise level, for a time-conditioned network
        raw = forward_live(process, network, z, t, None, live, state.canvas())  # (B, L, V), zeros off the live rows
        logits = process.denoise(raw)
        rows = live.nonzero().squeeze(1)
        gens = generators_of(state.generators, rows)
        valid = None if state.key_valid is None else state.key_valid[rows]
        u_draw = torch.zeros(B, L, dtype=torch.float64, device=device)
        u_noise = torch.zeros(B, L, device=device)
        u_draw[rows] = rand_rows(gens, (len(rows), L), device, torch.float64, valid)
        u_noise[rows] = rand_rows(gens, (len(rows), L), device, valid=valid)
        scaled = logits / temperature[:, None, None]  # (B, L, V)
        draw = sample_tokens(scaled.flatten(0, 1), u_draw.flatten()).view(B, L)  # inverse CDF, float64
        p = logits.softmax(-1)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (B, L)
        entropy = entropy.masked_fill(~gen, math.inf)  # given positions are never candidates
        rank = entropy.argsort(dim=1, stable=True).argsort(dim=1)  # (B, L): 0 = most confident
        keep_count = torch.ceil(gen.sum(1) * (n + 1) / self.steps)  # (B,)
        keep = (rank < keep_count[:, None]) & gen & live[:, None]
        noise = (u_noise * V).long().clamp_max(V - 1)  # uniform tokens
        renoise = gen & live[:, None] & ~keep
        z[:] = torch.where(keep, draw, torch.where(renoise, noise, z))
        confidence = scaled.softmax(-1).gather(-1, draw[..., None]).squeeze(-1) * keep  # (B, L)
        state.calls += 1
        state.nfe_per_row += live.cpu()
        state.tokens_computed += live.cpu() * L
        state.step = state.step + live.long()
        state.done = state.done | (state.step >= self.steps)
        event = StepEvent(state.events, z, keep, confidence, state.calls, state.nfe_per_row.clone())
        state.events += 1
        return state, event
