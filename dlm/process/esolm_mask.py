"""Eso-LM's attention rules as pure functions of (query index, key index, number of clean tokens), and the masks.

Eso-LM (Sahoo, Yang et al., arXiv 2506.01928; SPEC §7) runs the network on a *sorted* sequence: the clean tokens
first, then the [MASK] tokens; each token keeps its own rotary position (the positions are gathered by the same
order), so the sort changes which token may attend to which, nothing else. Indices below are places in the sorted
sequence; `num_clean` is how many of its first places hold clean tokens.

Two variants, named by what they do (the paper's names beside them; arXiv v4 renamed them):

- `attention="causal"`: causal attention on the sorted sequence, key k visible to query q iff k <= q. Every
  token's keys and values depend only on the tokens before it, so one KV cache is exact while decoding. The
  published main model: v1's "Eso-LM (B)", v4's "Eso-LM".
- `attention="clean_bidirectional"`: clean tokens attend to every clean token; a mask attends causally (to every
  clean token, the masks before it and itself). Not cacheable during diffusion; it recovers MDLM's perplexity at
  alpha0 = 1. v1's "Eso-LM (A)", an ablation in v4.

The sequential (autoregressive) half of training feeds the 2L sequence [z0_sorted ; x_sorted] (both halves with
the same rotary positions) under BD3-LM's rule at block size 1 (dlm.process.block_mask): the mask at sorted place i
of the first half sees the clean half's places < i (every clean token of z0 and the masks before it filled in with
their true tokens) and itself; the clean half is causal. With `clean_bidirectional` the clean half's first
`num_clean` places (z0's clean tokens) also see each other.
"""

from __future__ import annotations

import torch

from dlm.process.block_mask import block_diffusion_allowed

CAUSAL, CLEAN_BIDIRECTIONAL = "causal", "clean_bidirectional"
ATTENTIONS = (CAUSAL, CLEAN_BIDIRECTIONAL)
PAPER_NAMES = {CAUSAL: "Eso-LM (B) in arXiv v1-v3, Eso-LM in v4", CLEAN_BIDIRECTIONAL: "Eso-LM (A)"}


def check_attention(attention: str) -> None:
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown Eso-LM attention '{attention}'; valid: {', '.join(ATTENTIONS)} "
                         f"({CAUSAL}: {PAPER_NAMES[CAUSAL]}; {CLEAN_BIDIRECTIONAL}: {PAPER_NAMES[CLEAN_BIDIRECTIONAL]})")


def diffusion_allowed(q: torch.Tensor, k: torch.Tensor, num_clean, attention: str) -> torch.Tensor:
    """May query q attend to key k in the sorted sequence (clean places 0..num_clean-1, then masks)?

    q, k, num_clean: integer tensors (or ints) that broadcast together. Tensor ops only (no branch on values)."""
    allowed = k <= q
    if attention == CLEAN_BIDIRECTIONAL:
        allowed = allowed | ((q < num_clean) & (k < num_clean))
    return allowed


def sequential_allowed(q: torch.Tensor, k: torch.Tensor, seq_len: int, num_clean, attention: str) -> torch.Tensor:
    """May query q attend to key k in the 2L sequence [z0_sorted ; x_sorted] (indices < seq_len: z0, the rest: x)?
    BD3-LM's rule at block size 1, plus (clean_bidirectional) the first num_clean places of x seeing each other."""
    allowed = block_diffusion_allowed(q, k, seq_len, 1)
    if attention == CLEAN_BIDIRECTIONAL:
        q_x, k_x = q >= seq_len, k >= seq_len
        qi, ki = q - q_x * seq_len, k - k_x * seq_len
        allowed = allowed | (q_x & k_x & (qi < num_clean) & (ki < num_clean))
    return allowed


def diffusion_mask(num_clean: torch.Tensor, seq_len: int, attention: str) -> torch.Tensor:
    """(B, 1, L, L) bool SDPA mask (True = may attend) of the sorted sequences; num_clean (B,) long."""
    i = torch.arange(seq_len, device=num_clean.device)
    n = num_clean[:, None, None]
    return diffusion_allowed(i[:, None], i[None, :], n, attention).expand(n.shape[0], -1, -1)[:, None]


def sequential_mask(num_clean: torch.Tensor, seq_len: int, attention: str) -> torch.Tensor:
    """(B, 1, 2L, 2L) bool SDPA mask of [z0_sorted ; x_sorted]; num_clean (B,) long."""
    i = torch.arange(2 * seq_len, device=num_clean.device)
    n = num_clean[:, None, None]
    return sequential_allowed(i[:, None], i[None, :], seq_len, n, attention).expand(n.shape[0], -1, -1)[:, None]


def chunk_mask(num_cached: int, num_new: int, num_clean, attention: str, device=None) -> torch.Tensor:
    """(B or 1, 1, num_new, num_cached + num_new) bool mask of a call that feeds sorted places num_cached ..
    num_cached + num_new - 1 over a KV cache holding places 0 .. num_cached - 1 (a sampler's chunk): the rows of
    `diffusion_mask` for those places. num_clean: an int or a (B,) tensor (clean places of the sorted sequence)."""
    n = torch.as_tensor(num_clean, device=device).reshape(-1, 1, 1)
    q = torch.arange(num_cached, num_cached + num_new, device=device)
    k = torch.arange(num_cached + num_new, device=device)
    return diffusion_allowed(q[:, None], k[None, :], n, attention).expand(n.shape[0], -1, -1)[:, None]


def with_valid_keys(mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """mask (B, 1, T, T) with the keys of invalid places (padding, valid (B, T) False) hidden from every query but
    itself (a padded query's softmax row is never empty)."""
    T = valid.shape[1]
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    return (mask & valid[:, None, None, :]) | eye
