"""BD3-LM: block diffusion (Arriola et al., ICLR 2025, arXiv 2503.09573; SPEC §3).

The sequence x (length L) is split into L/B blocks of B tokens; log p(x) = sum_b log p(x^b | x^{<b}) and each
block is a masked diffusion conditioned on the clean blocks before it, with its own time t_b:

    NELBO = sum_b E_{t_b} [ w(t_b) * sum over masked l in block b of -log x_theta^l(z^b_{t_b}, x^{<b}) ].

One-pass training feeds [z_t ; x] (2L tokens, rotary positions 0..L-1 twice) with the attention rule of
`dlm.process.block_mask`; the loss reads the noisy half's outputs. B = L is MDLM; B = 1 is an autoregressive
factorisation (each token predicted from a [MASK] placeholder that sees the clean tokens before it).

Times are one per block (no time conditioning: the backbone's adaLN takes one time per sequence, and MDLM's
reference runs without it). Training may clip the mask rate to [clip_low, clip_high] (`with_clip`,
dlm.process.clipped_schedule); `nelbo` always uses the full range, so reported bounds stay unbiased.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlm.process.base import LossOutput, register_process
from dlm.process.block_mask import training_mask
from dlm.process.mdlm import MDLMConfig, SUBSProcess, check_schedule_fields, evaluation_times, subs_logits, uniform
from dlm.process.schedules import NoiseSchedule, make_schedule, time_of_mask_rate

MAX_RESAMPLES = 100


def check_block_size(block_size: int, length: int) -> None:
    """Raise a clear error unless `block_size` divides `length`."""
    if block_size < 1 or length % block_size:
        divisors = [d for d in range(1, length + 1) if length % d == 0]
        raise ValueError(f"block size {block_size} does not divide the sequence length {length}; "
                         f"valid block sizes: {', '.join(map(str, divisors))}")


@dataclass
class BD3LMConfig(MDLMConfig):
    name: str = "bd3lm"
    block_size: int = 0  # tokens per block, must divide model.context (0 = not set)
    clip_low: float = 0.0  # training draws the mask rate from U[clip_low, clip_high] (evaluation: full range)
    clip_high: float = 1.0
    clip_search: bool = False  # choose [clip_low, clip_high] by the data-driven search before training
    resample: bool = False  # redraw blocks whose masked fraction falls outside [clip_low, clip_high]


@register_process
class BlockDiffusion(SUBSProcess):
    """The BD3-LM process: per-block noising, the one-pass training loss and the (full-range) NELBO."""

    name = "bd3lm"
    corruption = "absorbing"
    exact_caches = frozenset({"blockwise"})  # a finished block's keys never change: its KV cache is exact
    blockwise = True
    config_class = BD3LMConfig

    def __init__(self, schedule: NoiseSchedule, mask_id: int, block_size: int, sampling_eps: float = 1e-3,
                 antithetic: bool = True, time_conditioning: bool = False, clip_low: float = 0.0,
                 clip_high: float = 1.0, resample: bool = False):
        if time_conditioning:
            raise ValueError("bd3lm draws one time per block, but the backbone's adaLN takes one time per sequence; "
                             "train it with model.time_conditioning=false (the MDLM/BD3-LM reference setting)")
        if block_size < 1:
            raise ValueError(f"bd3lm needs process.block_size >= 1 (got {block_size})")
        if not 0.0 <= clip_low < clip_high <= 1.0:
            raise ValueError(f"the mask-rate interval [{clip_low}, {clip_high}] must satisfy 0 <= clip_low < clip_high <= 1")
        if resample and not any(clip_low <= k / block_size <= clip_high for k in range(block_size + 1)):
            raise ValueError(f"process.resample=true can never succeed: no fraction k/{block_size} of a block lies in "
                             f"[{clip_low}, {clip_high}]; widen the interval or turn resampling off")
        super().__init__(mask_id, time_conditioning)
        self.schedule, self.block_size = schedule, block_size
        self.sampling_eps, self.antithetic = sampling_eps, antithetic
        self.clip_low, self.clip_high, self.resample = clip_low, clip_high, resample
        # Mask-rate interval -> time interval (exact inversion of the schedule); (0, 1) gives [sampling_eps, 1].
        self.t_low = max(sampling_eps, float(time_of_mask_rate(schedule, clip_low)))
        self.t_high = float(time_of_mask_rate(schedule, clip_high))

    @classmethod
    def from_config(cls, cfg, description):
        return cls(make_schedule(cfg.schedule, cfg.eps), description.mask_id, cfg.block_size, cfg.sampling_eps,
                   cfg.antithetic, description.time_conditioning, cfg.clip_low, cfg.clip_high, cfg.resample)

    @classmethod
    def check_config(cls, cfg) -> None:
        p, L = cfg.process, cfg.model.context
        check_schedule_fields(p)
        divisors = ", ".join(str(d) for d in range(1, L + 1) if L % d == 0)
        if p.block_size < 1:
            raise ValueError(f"process=bd3lm needs process.block_size (tokens per block) dividing model.context={L}; "
                             f"valid: {divisors}")
        if L % p.block_size:
            raise ValueError(f"process.block_size={p.block_size} does not divide model.context={L}; "
                             f"valid block sizes: {divisors}")
        if cfg.model.time_conditioning:
            raise ValueError("process=bd3lm draws one time per block but the backbone's adaLN takes one time per "
                              "sequence; set model.time_conditioning=false")
        if not 0.0 <= p.clip_low < p.clip_high <= 1.0:
            raise ValueError(f"the mask-rate interval process.clip_low={p.clip_low}, process.clip_high={p.clip_high} "
                              "must satisfy 0 <= clip_low < clip_high <= 1")

    def with_clip(self, clip_low: float, clip_high: float) -> "BlockDiffusion":
        """The same process training on mask rates in [clip_low, clip_high]."""
        return BlockDiffusion(self.schedule, self.mask_id, self.block_size, self.sampling_eps, self.antithetic,
                              self.time_conditioning, clip_low, clip_high, self.resample)

    # ------------------------------------------------------------------------------------------ noise
    def block_times(self, batch: int, num_blocks: int, generator=None, device=None) -> torch.Tensor:
        """t (B, num_blocks) in the clipped time interval, one per block. Antithetic: N = B * num_blocks strata
        (u + i/N) mod 1 for one shared u, spread so that each sequence's blocks cover the whole range."""
        n = batch * num_blocks
        if isinstance(generator, (list, tuple)):
            raise ValueError("per-row generators need explicit block times (t); pass t, as nelbo does")
        if self.antithetic:
            u = torch.rand(1, generator=generator, device=device)
            u = ((u + torch.arange(n, device=device) / n) % 1.0).view(num_blocks, batch).T  # (B, nb)
        else:
            u = torch.rand(batch, num_blocks, generator=generator, device=device)
        return self.t_low + (self.t_high - self.t_low) * u

    def add_noise(self, x: torch.Tensor, t_tok: torch.Tensor, loss_mask: torch.Tensor, generator=None) -> torch.Tensor:
        """z (B, L): each position in loss_mask becomes [MASK] with probability 1 - alpha at its block's time
        (t_tok (B, L)). With `resample`, blocks whose masked fraction falls outside [clip_low, clip_high] are
        redrawn (up to MAX_RESAMPLES times)."""
        p_mask = 1.0 - self.schedule.alpha(t_tok)
        z = torch.where((uniform(x.shape, generator, x.device) < p_mask) & loss_mask, self.mask_id, x)
        if not self.resample:
            return z
        B, L = x.shape
        nb = L // self.block_size
        scored = loss_mask.view(B, nb, self.block_size).sum(-1)  # (B, nb)
        for _ in range(MAX_RESAMPLES):
            frac = (z == self.mask_id).view(B, nb, self.block_size).sum(-1) / scored.clamp(min=1)
            bad = (scored > 0) & ((frac < self.clip_low) | (frac > self.clip_high))  # (B, nb)
            if not bad.any():
                break
            fresh = torch.where((uniform(x.shape, generator, x.device) < p_mask) & loss_mask, self.mask_id, x)
            z = torch.where(bad.repeat_interleave(self.block_size, dim=1), fresh, z)
        return z

    # ------------------------------------------------------------------------------------------ network
    def forward_logits(self, network, z, t, batch=None, inputs_embeds=None, **forward) -> torch.Tensor:
        """Logits (B, L, V) of the noisy half of [z ; x], x = batch["input_ids"] (the clean sequence).

        inputs_embeds (B, L, C), if given, replace the noisy half's token embeddings (soft-masking). Without a
        training batch but with the forward arguments of a sampling call (an attention mask or a KV cache: the
        blockwise sampler), the network is called on z as they say; bd3lm's network is never fed a time.
        """
        x = batch.get("input_ids") if batch else None
        if x is None and forward and (forward.get("attn_mask") is not None or forward.get("kv_cache") is not None):
            return super().forward_logits(network, z, None, None, inputs_embeds, **forward)
        if x is None:
            raise ValueError("bd3lm's forward pass needs the clean sequence (batch['input_ids']); to generate, use "
                             "the blockwise sampler (dlm.sampler.blockwise), which feeds clean blocks from a KV cache")
        L = x.shape[1]
        check_block_size(self.block_size, L)
        mask = _cached_training_mask(L, self.block_size, str(x.device))  # (2L, 2L)
        am = batch.get("attention_mask")
        if am is not None:  # padding keys are invisible in both halves
            mask = mask & torch.cat((am, am), 1)[:, None, None, :]  # (B, 1, 2L, 2L)
        positions = torch.arange(L, device=x.device).repeat(2)
        # The clean half's outputs are never scored: the output layer (the costliest matmul at small widths) runs
        # on the noisy half only.
        if inputs_embeds is None:
            return network(torch.cat((z, x), 1), attn_mask=mask, positions=positions, logits_at=slice(0, L))
        clean = network.embed_tokens(x)
        embeds = torch.cat((inputs_embeds.to(clean.dtype), clean), 1)
        return network(inputs_embeds=embeds, attn_mask=mask, positions=positions, logits_at=slice(0, L))  # (B, L, V)

    # ------------------------------------------------------------------------------------------ loss
    def _terms(self, network, batch, generator, t):
        """Per-token NELBO terms (B, L) and the times per block (B, nb). Given positions are neither noised nor
        scored (callers pass `honour_given(batch)`)."""
        x, loss_mask = batch["input_ids"], batch["loss_mask"]
        B, L = x.shape
        check_block_size(self.block_size, L)
        nb = L // self.block_size
        if t is None:
            t = self.block_times(B, nb, generator, x.device)
        elif t.dim() == 1:
            t = t[:, None].expand(B, nb)  # one time for every block of a sequence
        t_tok = t.repeat_interleave(self.block_size, dim=1)  # (B, L)
        z = self.add_noise(x, t_tok, loss_mask, generator)
        logits = self.forward_logits(network, z, t, batch)
        ce = F.cross_entropy(subs_logits(logits, self.mask_id).flatten(0, 1), x.flatten(), reduction="none").view_as(x)
        masked = (z == self.mask_id) & loss_mask
        # The weight only where a token is masked: at t = 0 it is infinite (or NaN), and 0 * inf would poison the sum
        # and the gradient. Nothing is masked at t = 0, so this changes no term.
        weight = torch.where(masked, self.schedule.loss_weight(t_tok), 0.0)
        return torch.where(masked, ce, 0.0) * weight

    def loss(self, network, batch: dict, generator: torch.Generator | None = None, t: torch.Tensor | None = None) -> LossOutput:
        """Training loss: the NELBO per scored token with one (clipped) time per block; t (B, nb) or (B,) to fix it."""
        batch = self.honour_given(batch)
        terms = self._terms(network, batch, generator, t)
        num_tokens = batch["loss_mask"].sum()
        total = terms.sum()
        return LossOutput(total / num_tokens.clamp(min=1), total.detach(), num_tokens.detach(), terms.detach().sum(1),
                          batch["loss_mask"].sum(1))

    @torch.no_grad()
    def per_block_nelbo(self, network, batch: dict, generator=None) -> torch.Tensor:
        """(B, num_blocks) NELBO estimate of each block per scored token (one draw; used by the clip search)."""
        batch = self.honour_given(batch)
        terms = self._terms(network, batch, generator, None)
        B, L = terms.shape
        scored = batch["loss_mask"].view(B, -1, self.block_size).sum(-1)
        return terms.view(B, -1, self.block_size).sum(-1) / scored.clamp(min=1)

    @torch.no_grad()
    def nelbo(self, network, batch: dict, num_t_samples: int, generator: torch.Generator) -> LossOutput:
        """Monte Carlo NELBO with `num_t_samples` antithetic times per block over the FULL range [sampling_eps, 1],
        whatever the training clip: the unbiased bound that evaluation reports."""
        batch = self.honour_given(batch)
        full = self.with_clip(0.0, 1.0)  # the times below are explicit
        full.resample = False  # the bound is over the unconditioned forward process
        x = batch["input_ids"]
        B, L = x.shape
        check_block_size(self.block_size, L)
        nb = L // self.block_size
        times = evaluation_times((B, nb), num_t_samples, self.sampling_eps, generator, x.device)  # (B, nb, n)
        nll_sum = torch.zeros((), device=x.device, dtype=torch.float64)
        per_row = torch.zeros(B, device=x.device, dtype=torch.float64)
        for j in range(num_t_samples):
            terms = full._terms(network, batch, generator, times[..., j])  # (B, L)
            nll_sum += terms.sum().double()
            per_row += terms.sum(1).double()
        num_tokens = batch["loss_mask"].sum()
        return LossOutput(nll_sum / num_t_samples / num_tokens, nll_sum / num_t_samples, num_tokens,
                          per_row / num_t_samples, batch["loss_mask"].sum(1))


@functools.lru_cache(maxsize=16)
def _cached_training_mask(seq_len: int, block_size: int, device: str) -> torch.Tensor:
    return training_mask(seq_len, block_size, torch.device(device))
