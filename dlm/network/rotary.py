"""Rotary position embeddings: the inverse frequencies (with the scalings open checkpoints use) and the rotation.

Pairs are (x[..., :hd/2], x[..., hd/2:]) ("rotate half"), the layout of GPT-NeoX, Llama, Qwen and OLMo/LLaDA.
Scalings follow transformers' `modeling_rope_utils` (rope_type "linear" and "llama3"); dlm computes them itself.
"""

from __future__ import annotations

import math

import torch

from dlm.network.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """The rotation speeds (head_size/2,) in float32: theta^(-2i/hd), then rescaled as `cfg.rope_scaling` says."""
    hd = cfg.head_size
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    if cfg.rope_scaling == "linear":  # position p is rotated as p / factor would be
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":  # long wavelengths slowed by the factor, short ones kept, a smooth band between
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_context
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)  # 0 at the long band's edge, 1 at the short band's
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
    """cos, sin for integer positions: (T, hd/2) for positions (T,) shared by the batch, or (B, 1, T, hd/2) for
    per-row positions (B, T) (left-padded prompts start at 0 on their first token)."""
    angles = positions.float()[..., None] * inv_freq  # (T, hd/2) or (B, T, hd/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, hd/2): broadcasts over the heads of (B, nh, T, hd)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, float32: bool = False) -> torch.Tensor:
    """Rotate pairs (x[..., :hd/2], x[..., hd/2:]) of x (B, nh, T, hd) by the position angles.

    float32=False: in x's dtype, cos and sin rounded to it first (transformers' Llama / Qwen2, hence Dream).
    float32=True: x and the float32 cos, sin multiplied in float32, the result rounded once to x's dtype (LLaDA's and
    OLMo's `rope_full_precision`). Identical for float32 x; for bf16 x the second rounds once instead of 3 times."""
    out_dtype = x.dtype
    if float32 and x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(out_dtype)
