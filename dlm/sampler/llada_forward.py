"""The forward passes of the LLaDA sampler (dlm.sampler.llada): the canvas's attention mask, per-row positions,
classifier-free guidance, Fast-dLLM's caches (dlm.sampler.fast_dllm) and soft-masking inputs of the current block."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.sampler.base import masked_fraction


def canvas_attention_mask(key_valid: torch.Tensor, gen_start, block_length, block_causal: bool) -> torch.Tensor | None:
    """(B, 1, T, T) bool (True = may attend), or None when every position may see every other.

    key_valid (B, T): False on left padding. Pad queries see themselves only, so no softmax row is empty.
    gen_start, block_length: ints, or (B,) long, each row's own (rows of a running batch may differ).
    block_causal: a query sees the keys of its own and earlier blocks only (the prompt is block 0).
    """
    B, T = key_valid.shape
    if key_valid.all() and not block_causal:
        return None
    idx = torch.arange(T, device=key_valid.device)
    allowed = key_valid[:, None, :] | torch.eye(T, dtype=torch.bool, device=key_valid.device)  # (B, T_q, T_k)
    if block_causal:
        as_rows = lambda v: torch.as_tensor(v, device=idx.device).reshape(-1, 1)  # noqa: E731  (B or 1, 1)
        gs, bl = as_rows(gen_start), as_rows(block_length)
        block = torch.where(idx < gs, 0, torch.div(idx - gs, bl, rounding_mode="floor") + 1)  # (B or 1, T)
        allowed = allowed & (block[:, None, :] <= block[:, :, None])
    return allowed[:, None]


@dataclass
class Context:
    """What every forward of one generation shares."""

    network: torch.nn.Module
    process: object
    positions: torch.Tensor  # (T,) or per-row (B, T) rotary positions
    full_mask: torch.Tensor | None  # (B, 1, T, T) bool or None
    prompt: torch.Tensor  # (B, T) bool: real prompt tokens (masked in the unconditional pass)
    generated: torch.Tensor  # (B, T) bool: the positions to generate (a suffix of each row)
    cfg_scale: float = 0.0

    def select(self, rows: torch.Tensor) -> "Context":
        """The context of a sub-batch: rows (B_a,) indices into the batch."""
        pick = lambda t: t if t is None or t.dim() < 2 or t.shape[0] == 1 else t[rows]  # noqa: E731
        return Context(self.network, self.process, pick(self.positions), pick(self.full_mask), self.prompt[rows],
                       self.generated[rows], self.cfg_scale)


def forward_block(ctx: Context, x, span, block, block_embeds, cache, mask, cache_update) -> torch.Tensor:
    """Raw logits (B, block_length, V) of the block, from a forward over the queries x[:, qs:qe] (guided when
    cfg_scale > 0). The block's still-masked positions are fed `block_embeds` (B, block_length, C) when
    soft-masking. Only the block's hidden states go through the output layer: the others are never used."""
    (qs, qe), (start, end) = span, block
    network, process = ctx.network, ctx.process
    ids = x[:, qs:qe]
    embeds = None
    if block_embeds is not None:
        embeds = network.embed(ids)  # (B, T_q, C)
        embeds[:, start - qs:end - qs] = block_embeds.to(embeds.dtype)
    positions = ctx.positions[..., qs:qe]
    if mask is None and ctx.full_mask is not None:  # a whole-canvas forward
        mask = ctx.full_mask[:, :, qs:qe]
    t = None
    if process.time_conditioning:  # the time whose mask rate 1 - alpha_t is the fraction still masked
        gen = ctx.generated
        masked = (process.is_noise(x) & gen).sum(1).double() / gen.sum(1).double()  # (B,): the mean over the suffix
        t = process.time_of_mask_rate(masked).to(torch.float32)
    if ctx.cfg_scale > 0:
        prompt = ctx.prompt[:, qs:qe]
        ids = torch.cat((ids, torch.where(prompt, process.mask_id, ids)))
        if embeds is not None:
            mask_embed = network.embed.weight[process.mask_id].to(embeds.dtype)
            embeds = torch.cat((embeds, torch.where(prompt[..., None], mask_embed, embeds)))
        positions = positions.repeat(2, 1) if positions.dim() == 2 else positions
        mask = None if mask is None else torch.cat((mask, mask)) if mask.shape[0] > 1 else mask
        t = None if t is None else torch.cat((t, t))
    out = process.forward_logits(network, ids, t, None, embeds, attn_mask=mask, positions=positions, kv_cache=cache,
                                 cache_update=cache_update, logits_at=slice(start - qs, end - qs))  # (B or 2B, b, V)
    return guided_logits(out, ctx.cfg_scale) if ctx.cfg_scale > 0 else out


def guided_logits(out: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance of a doubled batch (2B, ..., V) = [conditional ; unconditional]: u + (s + 1)(c - u),
    in float32 (bf16 halves would round the difference c - u away)."""
    cond, uncond = out.float().chunk(2)
    return uncond + (cfg_scale + 1) * (cond - uncond)


def feedback_inputs(feedback, ctx: Context, x, block, raw_block):
    """Soft-masking inputs (B, block_length, C) of the block's next step from this step's logits, each row
    scheduled by its own fraction of masks left, or None (plain tokens)."""
    network, (start, end) = ctx.network, block
    masks_left = masked_fraction(ctx.process, x, ctx.generated)  # (B,)
    x_block = x[:, start:end]
    return feedback(network, x_block, raw_block, torch.zeros_like(x_block, dtype=torch.bool), masks_left)
