"""Left-to-right sampling for the autoregressive baseline, with a KV cache (one token per network call)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.network import KVCache
from dlm.sampler.base import (Canvas, SampleOutput, Sampler, StepReporter, chosen_probability, generators_of,
                              rand_rows, sample_tokens)
from dlm.sampler.registry import check_temperature, check_top_p, register_sampler


@dataclass
class AutoregressiveConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    kv_cache: bool = True
    suppress_ids: tuple[int, ...] = ()  # never generated (e.g. [MASK], [PAD], [BOS])

    def __post_init__(self):
        check_temperature(self.temperature)
        check_top_p(self.top_p)


@register_sampler("autoregressive", AutoregressiveConfig,
                  description="left to right, one token per network call, with a KV cache (autoregressive models)")
class AutoregressiveSampler(Sampler):
    name = "autoregressive"
    corruptions = ("none",)
    autoregressive = True

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, kv_cache: bool = True,
                 suppress_ids: tuple[int, ...] = ()):
        AutoregressiveConfig(temperature, top_p)  # validates
        self.temperature, self.top_p, self.kv_cache = temperature, top_p, kv_cache
        self.suppress_ids = list(suppress_ids)

    @torch.no_grad()
    def sample(self, network, process, canvas: Canvas, generator=None, callback=None) -> SampleOutput:
        """canvas (B, L): a prompt followed by the positions to generate, which must form one suffix shared by every
        row."""
        process.check_sampler(self)
        fixed = canvas.fixed
        n_prompt = int(fixed[0].sum())
        if not (fixed[:, :n_prompt].all() and not fixed[:, n_prompt:].any()):
            raise ValueError("an autoregressive model can only continue a prefix: fixed tokens after the generated "
                             "positions (infilling) need a diffusion model")
        z = canvas.tokens.clone()
        B, L = z.shape
        steps = StepReporter(B, callback, L)
        cache = KVCache() if self.kv_cache else None
        rows = torch.arange(B, device=z.device)  # the rows still generating, in cache order
        next_input = z[:, :n_prompt]
        valid, where = canvas.key_valid, canvas.positions  # left padding (never attended to), rotary positions

        def cols(x, a, b):  # columns [a, b) of the live rows of a (B, L) or (L,) tensor, or None
            return None if x is None else x[a:b] if x.dim() == 1 else x[rows, a:b]

        for pos in range(n_prompt, L):
            if cache is not None:
                first = pos == n_prompt  # the prompt, then one token per call
                a = 0 if first else pos - 1
                update = cols(valid, 0, pos) if first and valid is not None else True
                logits = process.forward_logits(network, next_input, None, key_valid=cols(valid, a, pos) if first
                                                else None, positions=cols(where, a, pos), kv_cache=cache,
                                                cache_update=update, logits_at=slice(-1, None))[:, -1]
            else:
                logits = process.forward_logits(network, z[rows, :pos], None, key_valid=cols(valid, 0, pos),
                                                positions=cols(where, 0, pos), logits_at=slice(-1, None))[:, -1]
            steps.called(rows, next_input.shape[1] if cache is not None else pos)
            if self.suppress_ids:
                logits[:, self.suppress_ids] = float("-inf")
            if isinstance(generator, (list, tuple)):  # one generator per row: the live rows draw
                u = rand_rows(generators_of(generator, rows), (rows.numel(),), z.device, torch.float64)
            else:
                u = rand_rows(generator, (B,), z.device, torch.float64)[rows]
            nxt = sample_tokens(logits.float(), u, self.temperature, self.top_p)  # (B_a,)
            z[rows, pos] = nxt
            next_input = nxt[:, None]
            committed = torch.zeros(B, L, dtype=torch.bool, device=z.device)
            committed[rows, pos] = True
            confidence = None
            if callback is not None:
                confidence = torch.zeros(B, L, device=z.device)
                confidence[rows, pos] = chosen_probability(logits, nxt)
            steps.report(z, committed, confidence)
            keep = steps.live(z.device)[rows]  # (B_a,)
            if not keep.all():  # stopped rows leave the batch (and the cache)
                rows, next_input = rows[keep], next_input[keep]
                if cache is not None:
                    cache = cache.select(keep.nonzero().squeeze(1))
                if rows.numel() == 0:
                    break
        return steps.output(z)
