"""The backbone: a pre-norm transformer with rotary positions and optional adaLN time conditioning.

The same network serves every process: bidirectional for masked diffusion (no mask), causal for the
autoregressive baseline (`causal=True`), or any boolean attention mask (block diffusion). It takes token
ids or input embeddings (soft-masking feeds embeddings), and can read and extend a `KVCache`. It follows the
contract in dlm/network/base.py (`logits_at`, `prediction`). The options of `ModelConfig` (RMSNorm, SwiGLU,
grouped K/V, biases, QK-norm, rope scaling, learned positions, shifted predictions) let it hold the weights of
open checkpoints (dlm/network/families); the defaults are dlm's own network.

Reading order: (KVCache, dlm/network/kv_cache.py) -> norms -> Attention -> MLP -> Block -> Transformer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dlm.network.config import ModelConfig
from dlm.network.attention import attend
from dlm.network.base import select_positions, shift_hidden
from dlm.network.kv_cache import KVCache, updates_cache, appended_columns
from dlm.network.rotary import apply_rotary, rope_inv_freq, rotary_cos_sin


# ------------------------------------------------------------------------------------------ modules
class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in float32 and cast back before the weight (as Llama, Qwen and OLMo do)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y if self.weight is None else self.weight * y


def make_norm(cfg: ModelConfig, dim: int, affine: bool = True) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, elementwise_affine=affine)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=affine, bias=cfg.norm_bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_size
        q_dim, kv_dim = self.n_head * self.hd, self.n_kv * self.hd
        self.split = (q_dim, kv_dim, kv_dim)
        if cfg.fused_qkv:  # dlm's layout: one projection, [q | k | v] along the output
            self.qkv = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        else:  # loaded checkpoints: separate tensors, assigned without concatenating (no copy)
            self.q = nn.Linear(cfg.d_model, q_dim, bias=cfg.qkv_bias)
            self.k = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
            self.v = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.q_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.proj_bias)
        self.dropout = cfg.dropout
        self.rope_float32 = cfg.rope_float32

    def forward(self, x, cos, sin, attn_mask, causal, cache: KVCache | None, layer: int, cache_update: bool):
        B, T, _ = x.shape
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).split(self.split, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin, self.rope_float32), apply_rotary(k, cos, sin, self.rope_float32)
        update = cache is not None and updates_cache(cache_update)
        cols = appended_columns(cache_update, T) if update else None
        if cache is not None and cache.capacity and cols is None:  # in place: (B, n_kv, T_cache + T, hd) views
            k_all, v_all = cache.write(layer, k, v, keep=update)  # (read-only calls: written as scratch past the end)
            update = False
        elif cache is not None and layer < len(cache.layers):
            k_past, v_past = cache.layers[layer]
            k_all, v_all = torch.cat((k_past, k), dim=2), torch.cat((v_past, v), dim=2)  # (B, n_kv, T_cache + T, hd)
        else:
            k_all, v_all = k, v
        if update:
            kept = (k_all, v_all) if cols is None else (torch.cat((k_all[:, :, :-T], k[:, :, cols]), 2),
                                                        torch.cat((v_all[:, :, :-T], v[:, :, cols]), 2))
            if layer < len(cache.layers):
                cache.layers[layer] = kept
            else:
                cache.layers.append(kept)
        if self.n_kv != self.n_head:  # query head h reads K/V head h // (nh / n_kv)
            k_all = k_all.repeat_interleave(self.n_head // self.n_kv, dim=1)  # (B, nh, S, hd)
            v_all = v_all.repeat_interleave(self.n_head // self.n_kv, dim=1)
        # With a cache, "causal" means: attend to everything cached plus the causal part of the new tokens.
        y = attend(q, k_all, v_all, attn_mask, causal, self.dropout if self.training else 0.0)  # (B, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    """gelu: proj(gelu_tanh(fc(x))). swiglu: proj(silu(gate(x)) * fc(x)) (fc is Llama's up_proj)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_width, bias=cfg.mlp_bias)
        self.gate = nn.Linear(cfg.d_model, cfg.mlp_width, bias=cfg.mlp_bias) if cfg.mlp == "swiglu" else None
        self.proj = nn.Linear(cfg.mlp_width, cfg.d_model, bias=cfg.mlp_bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = F.gelu(self.fc(x), approximate="tanh") if self.gate is None else F.silu(self.gate(x)) * self.fc(x)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-norm block. With time conditioning, adaLN: the conditioning vector c gives each sub-layer a
    shift, scale and gate (initialised to zero, so the block starts as a plain pre-norm block)."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.ln1 = make_norm(cfg, cfg.d_model, affine=not cfg.time_conditioning)
        self.ln2 = make_norm(cfg, cfg.d_model, affine=not cfg.time_conditioning)
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
    """Maps token ids (B, T) or input embeddings (B, T, C) to logits (B, T, V); see dlm/network/base.py."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (it comes from the tokenizer)")
        problems = cfg.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.context, cfg.d_model) if cfg.positions == "learned" else None
        self.time_embed = TimeEmbedding(cfg.cond_dim) if cfg.time_conditioning else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg, cfg.d_model, affine=not cfg.time_conditioning)
        self.final_adaln = nn.Linear(cfg.cond_dim, 2 * cfg.d_model) if cfg.time_conditioning else None
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Training-time memory switches (not part of the saved config; the training module sets them from
        # trainer.gradient_checkpointing / trainer.chunked_ce, a loaded or exported network has them off):
        # recompute each block in the backward instead of keeping its activations (only in training mode with
        # gradients on, without a KV cache), and the rows of logits a loss computes at once (dlm/network/chunked_ce.py).
        self.gradient_checkpointing = False
        self.ce_chunk = 0
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

    # The contract's properties (dlm/network/base.py).
    @property
    def context(self) -> int:
        return self.cfg.context

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    @property
    def prediction(self) -> str:
        return self.cfg.prediction

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, T, C) of token ids (B, T); forward(inputs_embeds=...) of them equals forward(ids)."""
        return self.embed(input_ids)

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
        positions: torch.Tensor | None = None,  # (T,) or per-row (B, T); default cache.length + arange(T)
        kv_cache: KVCache | None = None,
        cache_update: bool | torch.Tensor = False,  # True: append every position; a (T,) / (B, T) bool mask: those
        return_hidden: bool = False,  # the hidden states the output layer would read, (B, T, C), instead of logits
        logits_at: slice | torch.Tensor | None = None,  # positions that get logits (dlm/network/base.py)
    ) -> torch.Tensor:
        """Logits (B, T, V), or (B, T', V) / (N, V) at the positions `logits_at` chooses. For a shifted network the
        logits (and `return_hidden`'s states) at position i are computed from the hidden state at i - 1."""
        x, previous = self._final_states(input_ids, inputs_embeds, t, attn_mask, causal, positions, kv_cache,
                                         cache_update)
        if self.cfg.prediction == "shifted":
            x = shift_hidden(x, previous)  # row i now holds the hidden state of position i - 1
        x = select_positions(x, logits_at)
        if return_hidden:
            return x
        return self.head(x)  # (B, T, V), (B, T', V) or (N, V)

    def next_token_logits(self, input_ids=None, inputs_embeds=None, positions=None, kv_cache=None,
                          cache_update=False, return_hidden=False, logits_at=None, attn_mask=None) -> torch.Tensor:
        """Left-to-right decoding and scoring: causal attention, and the logits at position l are about token l + 1
        (B, T, V) (or the positions `logits_at` chooses). A dlm autoregressive network was trained that way; a
        shifted network (a causal LM's own head) gets them from each position's own hidden state, unshifted, so the
        last position predicts the token after the input."""
        if self.cfg.prediction != "shifted":
            return self(input_ids, inputs_embeds, attn_mask=attn_mask, causal=True, positions=positions, kv_cache=kv_cache,
                        cache_update=cache_update, return_hidden=return_hidden, logits_at=logits_at)
        x, _ = self._final_states(input_ids, inputs_embeds, None, attn_mask, True, positions, kv_cache, cache_update)
        x = select_positions(x, logits_at)
        return x if return_hidden else self.head(x)

    def _final_states(self, input_ids, inputs_embeds, t, attn_mask, causal, positions, kv_cache, cache_update):
        """(final hidden states (B, T, C) after the last norm, unshifted; the last cached position's state (B, 1, C)
        that a shifted network's first position reads, or None). Extends the cache's states with cache_update."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give the network either input_ids (B, T) or inputs_embeds (B, T, C), not both or neither")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length); got shape {tuple(input_ids.shape)} "
                             "(a single sequence: input_ids[None])")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        if x.dim() != 3 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"inputs_embeds must be (batch, length, {self.cfg.d_model}); got {tuple(x.shape)}")
        B, T, _ = x.shape
        start = kv_cache.length if kv_cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=x.device)
        elif positions.shape not in ((T,), (B, T)):
            raise ValueError(f"positions must be ({T},) or ({B}, {T}) for this input; got {tuple(positions.shape)}")
        if t is not None and t.dim() == 0:
            t = t.expand(B)  # one time for every row
        if t is not None and t.shape != (B,):
            raise ValueError(f"t must be one diffusion time per row, shape ({B},); got {tuple(t.shape)}")
        cos = sin = None
        if self.pos_embed is None:
            cos, sin = rotary_cos_sin(positions, rope_inv_freq(self.cfg, x.device))
        else:
            if int(positions.max()) >= self.cfg.context:
                raise ValueError(f"position {int(positions.max())} is past the learned position table "
                                 f"({self.cfg.context} rows)")
            x = x + self.pos_embed(positions)  # (T, C) or (B, T, C), broadcast over the batch
        cond = None
        if self.time_embed is not None:
            if t is None:
                t = torch.zeros(B, device=x.device)
            cond = F.silu(self.time_embed(t))  # (B, cond_dim)
        previous = self._previous_hidden(kv_cache, start, cache_update)  # read before the blocks extend the cache
        if kv_cache is not None and kv_cache.key_valid is not None and start > 0:  # cached keys a row may not see
            cached = kv_cache.attention_mask(B, T, x.device)  # (B, 1, 1, T_cache + T)
            attn_mask = cached if attn_mask is None else attn_mask & cached
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for block in self.blocks:
            if recompute:  # keep only the block's input; its activations are recomputed in the backward
                x = checkpoint(block, x, cond, cos, sin, attn_mask, causal, None, False, use_reentrant=False)
            else:
                x = block(x, cond, cos, sin, attn_mask, causal, kv_cache, cache_update)
        x = self.ln_f(x)
        if self.final_adaln is not None:
            shift, scale = self.final_adaln(cond)[:, None].chunk(2, dim=-1)
            x = x * (1 + scale) + shift
        if kv_cache is not None and updates_cache(cache_update):
            cols = appended_columns(cache_update, T)
            kv_cache.append_valid(cache_update, B, T, x.device)
            if self.cfg.prediction == "shifted":
                kept = x if cols is None else x[:, cols]
                kv_cache.hidden = kept if kv_cache.hidden is None or start == 0 else torch.cat((kv_cache.hidden, kept), 1)
        return x, previous

    def _previous_hidden(self, kv_cache: KVCache | None, start: int, cache_update: bool) -> torch.Tensor | None:
        """A shifted network's hidden state (B, 1, C) at the last cached position (None without a cached prefix)."""
        if self.cfg.prediction != "shifted" or start == 0:
            return None
        held = None if kv_cache.hidden is None else kv_cache.hidden.shape[1]
        if held is None or held > start or (updates_cache(cache_update) and held != start):
            raise ValueError("this network's predictions are shifted (position i reads the hidden state at i - 1), "
                             "so its KV cache must hold the final hidden states of the cached positions before the "
                             "queries (all of them when the cache is extended): fill the cache through this "
                             "network's forward(cache_update=True) and keep `hidden` when assembling layers")
        return kv_cache.hidden[:, -1:] if held > 0 else None
