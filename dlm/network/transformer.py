"""The backbone: a pre-LN transformer with rotary positions and optional adaLN time conditioning.

The same network serves every process: bidirectional for masked diffusion (no mask), causal for the
autoregressive baseline (`causal=True`), or any boolean attention mask (block diffusion). It takes token
ids or input embeddings (soft-masking feeds embeddings), and can read and extend a `KVCache`.

Reading order: Rotary -> Attention -> MLP -> Block -> Transformer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from dlm.config import ModelConfig
from dlm.network.attention import attend


# --------------------------------------------------------------------------------------------- rotary
def rotary_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """cos, sin for integer positions: (T, head_dim/2) for positions (T,) shared by the batch, or
    (B, 1, T, head_dim/2) for per-row positions (B, T) (left-padded prompts start at 0 on their first token)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (T, hd/2) or (B, T, hd/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, hd/2): broadcasts over the heads of (B, nh, T, hd)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :hd/2], x[..., hd/2:]) of x (B, nh, T, hd) by the position angles."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ------------------------------------------------------------------------------------------- KV cache
@dataclass
class KVCache:
    """Keys and values of tokens already processed, one (k, v) pair per layer, each (B, nh, T_cache, hd).

    A forward pass with `kv_cache=cache` attends to the cached keys before its own; with
    `cache_update=True` it also appends its own keys/values (autoregressive decoding, a finished block).
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0

    def crop(self, length: int) -> None:
        """Keep only the first `length` cached positions (sliding windows, dropping a suffix)."""
        self.layers = [(k[:, :, :length], v[:, :, :length]) for k, v in self.layers]

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache holding only the batch rows `rows` (B_a,) (a sampler that drops finished sequences)."""
        return KVCache([(k[rows], v[rows]) for k, v in self.layers])


# ------------------------------------------------------------------------------------------ modules
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, attn_mask, causal, cache: KVCache | None, layer: int, cache_update: bool):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None and layer < len(cache.layers):
            k_past, v_past = cache.layers[layer]
            k_all, v_all = torch.cat((k_past, k), dim=2), torch.cat((v_past, v), dim=2)  # (B, nh, T_cache + T, hd)
        else:
            k_all, v_all = k, v
        if cache is not None and cache_update:
            if layer < len(cache.layers):
                cache.layers[layer] = (k_all, v_all)
            else:
                cache.layers.append((k_all, v_all))
        # With a cache, "causal" means: attend to everything cached plus the causal part of the new tokens.
        y = attend(q, k_all, v_all, attn_mask, causal, self.dropout if self.training else 0.0)  # (B, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN block. With time conditioning, adaLN: the conditioning vector c gives each sub-layer a
    shift, scale and gate (initialised to zero, so the block starts as a plain pre-LN block)."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.ln1 = nn.LayerNorm(cfg.d_model, elementwise_affine=not cfg.time_conditioning)
        self.ln2 = nn.LayerNorm(cfg.d_model, elementwise_affine=not cfg.time_conditioning)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.adaln = nn.Linear(cfg.cond_dim, 6 * cfg.d_model) if cfg.time_conditioning else None  # zeroed by Transformer

    def forward(self, x, cond, cos, sin, attn_mask, causal, cache, cache_update):
        if self.adaln is None:
            x = x + self.resid_dropout(self.attn(self.ln1(x), cos, sin, attn_mask, causal, cache, self.index, cache_update))
            return x + self.mlp(self.ln2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(cond)[:, None].chunk(6, dim=-1)  # 6 x (B, 1, C)
        h = self.ln1(x) * (1 + scale1) + shift1
        x = x + gate1.add(1) * self.resid_dropout(self.attn(h, cos, sin, attn_mask, causal, cache, self.index, cache_update))
        h = self.ln2(x) * (1 + scale2) + shift2
        return x + gate2.add(1) * self.mlp(h)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1] followed by an MLP: (B,) -> (B, cond_dim)."""

    def __init__(self, cond_dim: int, n_freq: int = 256):
        super().__init__()
        self.n_freq = n_freq
        self.mlp = nn.Sequential(nn.Linear(n_freq, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.n_freq // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half); 1000x so t in [0,1] spans the frequencies
        features = torch.cat((angles.cos(), angles.sin()), dim=-1)  # float32 angles, then the network's dtype
        return self.mlp(features.to(self.mlp[0].weight.dtype))


# ------------------------------------------------------------------------------------------ network
class Transformer(nn.Module):
    """Maps token ids (B, T) or input embeddings (B, T, C) to logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (it comes from the tokenizer)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.time_embed = TimeEmbedding(cfg.cond_dim) if cfg.time_conditioning else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, elementwise_affine=not cfg.time_conditioning)
        self.final_adaln = nn.Linear(cfg.cond_dim, 2 * cfg.d_model) if cfg.time_conditioning else None
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_weights:
            self.head.weight = self.embed.weight
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        for block in self.blocks:
            if block.adaln is not None:
                nn.init.zeros_(block.adaln.weight)
                nn.init.zeros_(block.adaln.bias)
        if self.final_adaln is not None:
            nn.init.zeros_(self.final_adaln.weight)
            nn.init.zeros_(self.final_adaln.bias)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T) token ids
        inputs_embeds: torch.Tensor | None = None,  # (B, T, C) instead of ids
        t: torch.Tensor | None = None,  # (B,) diffusion time, used only with time conditioning
        attn_mask: torch.Tensor | None = None,  # bool, broadcastable to (B, nh, T, T_cache + T); True = may attend
        causal: bool = False,
        positions: torch.Tensor | None = None,  # (T,) or per-row (B, T) rotary positions; default cache.length + arange(T)
        kv_cache: KVCache | None = None,
        cache_update: bool = False,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give the network either input_ids (B, T) or inputs_embeds (B, T, C), not both or neither")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length); got shape {tuple(input_ids.shape)} "
                             "(a single sequence: input_ids[None])")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        if x.dim() != 3 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"inputs_embeds must be (batch, length, {self.cfg.d_model}); got {tuple(x.shape)}")
        B, T, _ = x.shape
        if positions is None:
            start = kv_cache.length if kv_cache is not None else 0
            positions = torch.arange(start, start + T, device=x.device)
        elif positions.shape not in ((T,), (B, T)):
            raise ValueError(f"positions must be ({T},) or ({B}, {T}) for this input; got {tuple(positions.shape)}")
        if t is not None and t.dim() == 0:
            t = t.expand(B)  # one time for every row
        if t is not None and t.shape != (B,):
            raise ValueError(f"t must be one diffusion time per row, shape ({B},); got {tuple(t.shape)}")
        cos, sin = rotary_cos_sin(positions, self.cfg.d_model // self.cfg.n_head)
        cond = None
        if self.time_embed is not None:
            if t is None:
                t = torch.zeros(B, device=x.device)
            cond = F.silu(self.time_embed(t))  # (B, cond_dim)
        for block in self.blocks:
            x = block(x, cond, cos, sin, attn_mask, causal, kv_cache, cache_update)
        x = self.ln_f(x)
        if self.final_adaln is not None:
            shift, scale = self.final_adaln(cond)[:, None].chunk(2, dim=-1)
            x = x * (1 + scale) + shift
        if return_hidden:
            return x
        return self.head(x)  # (B, T, V)
