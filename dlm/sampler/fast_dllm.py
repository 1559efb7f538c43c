"""Fast-dLLM's approximate KV caches for block-wise sampling with a bidirectional model (arXiv 2505.22618).

At the first step of each block (the refresh) the network runs over the whole canvas and stores every
layer's keys and values. The later steps of the block reuse part of them:

- "prefix": the keys/values of everything before the block are kept; each step feeds the block and all
  that follows it (the suffix) as queries.
- "dual": the suffix's keys/values are kept too; each step feeds only the block.

Rotary positions are applied before keys are cached, so cached keys can sit in the cache in any order:
the dual cache holds [prefix ; suffix] and the block's queries bring their own positions. The attention
mask of a cached step is the full canvas mask with its key columns put in the same order
(`key_index`). For a bidirectional model the cache is approximate (the cached keys were computed when the
block was all masks); for a model whose positions never attend to later blocks (block-causal) and that has
no time conditioning, the prefix is exact and so is the dual cache, since the block's queries cannot see the
suffix. (A time-conditioned network's cached keys keep the time of the block's first step: approximate.)
"""

from __future__ import annotations

import torch

from dlm.network import KVCache

CACHE_MODES = ("none", "prefix", "dual")


def check_cache_mode(mode: str) -> str:
    if mode not in CACHE_MODES:
        raise ValueError(f"cache='{mode}' is not a cache mode; valid: {', '.join(CACHE_MODES)}")
    return mode


def query_span(mode: str, start: int, end: int, length: int) -> tuple[int, int]:
    """Canvas positions [qs, qe) fed as queries at a cached step of block [start, end) of a canvas of `length`."""
    if mode == "prefix":
        return start, length
    if mode == "dual":
        return start, end
    return 0, length


def cached_positions(mode: str, start: int, end: int, length: int, device) -> torch.Tensor:
    """(T_cache,) canvas index of each cached key, in cache order."""
    if mode == "prefix":
        return torch.arange(start, device=device)
    if mode == "dual":
        return torch.cat((torch.arange(start, device=device), torch.arange(end, length, device=device)))
    return torch.arange(0, device=device)


def keep_cached(mode: str, full: KVCache, start: int, end: int) -> KVCache:
    """From the keys/values of the whole canvas (a refresh forward), the cache for the block's later steps."""
    # A shifted network's block reads the final hidden state at start - 1: the prefix's states go along (both modes
    # put the prefix first, right before the block's queries).
    hidden = None if full.hidden is None else full.hidden[:, :start]  # (B, start, C)
    if mode == "prefix":
        return KVCache([(k[:, :, :start], v[:, :, :start]) for k, v in full.layers], hidden)
    if mode == "dual":
        return KVCache([(torch.cat((k[:, :, :start], k[:, :, end:]), 2), torch.cat((v[:, :, :start], v[:, :, end:]), 2))
                        for k, v in full.layers], hidden)  # each (B, nh, T - (end - start), hd)
    raise ValueError(f"cache mode '{mode}' keeps nothing")


def step_attention_mask(full_mask: torch.Tensor | None, mode: str, start: int, end: int) -> torch.Tensor | None:
    """Slice the canvas mask (B, 1, T, T) to a cached step: (B, 1, T_q, T_cache + T_q), keys in cache order
    followed by the queries. None stays None (every key visible)."""
    if full_mask is None:
        return None
    T = full_mask.shape[-1]
    qs, qe = query_span(mode, start, end, T)
    device = full_mask.device
    keys = torch.cat((cached_positions(mode, start, end, T, device), torch.arange(qs, qe, device=device)))
    return full_mask[:, :, qs:qe][..., keys]
