"""The contract every network follows: what processes, samplers and pipelines may call.

A network maps token ids (B, T) or input embeddings (B, T, C) to logits over its vocabulary::

    forward(input_ids=None, inputs_embeds=None, t=None, attn_mask=None, causal=False, positions=None,
            kv_cache=None, cache_update=False, return_hidden=False, logits_at=None) -> logits

- `t` (B,): diffusion time, read only by time-conditioned networks.
- `attn_mask`: bool, broadcastable to (B, nh, T, T_cache + T), True = may attend; `causal=True` adds the causal rule.
- `positions`: (T,) shared by the batch or per row (B, T); default `kv_cache.length + arange(T)`.
- `kv_cache` / `cache_update`: attend to cached keys first (those the cache's per-row `key_valid` allows); with
  `cache_update=True`, append this call's keys; with a bool mask (T,) or (B, T), only the positions it marks.
- `logits_at`: which positions get logits. None: all, (B, T, V). A `slice` over T: (B, T', V). A bool tensor
  (B, T): (N, V) for its True positions in row-major order. The output layer runs only on the chosen positions
  (the masked-diffusion loss needs logits at the masked positions only; the vocabulary projection is the largest
  matrix product of a small model).

- `return_hidden`: the final hidden states the output layer would read at the chosen positions ((B, T, C), (B, T',
  C) or (N, C)) instead of logits; `head(hidden)` is then the logits (`head`: the output layer, (..., C) -> (..., V)).
  A loss that must not hold all (N, V) logits at once calls the head on chunks of them (dlm/network/chunked_ce.py).

`prediction` says which token the logits at position i are about:

- "same_position": token i (MDLM, LLaDA, dlm's own networks).
- "shifted": also token i, but computed from the hidden state at i - 1, as a causal LM's next-token head is (Dream
  and any causal LM adapted to diffusion keep that alignment so the pretrained head stays useful). Position 0,
  which has no predecessor, uses its own hidden state (Dream's `cat([logits[:, :1], logits[:, :-1]], 1)`). The
  network applies the shift itself, so callers index logits by the token they predict for both kinds. With a KV
  cache the first position of a chunk reads the hidden state of the last cached position: a shifted network keeps
  its final hidden states in the cache (`KVCache.hidden`) and refuses a cache that lacks them.

Left-to-right use (the autoregressive process and sampler, a model as an evaluator) goes through
`next_token_logits(input_ids=None, inputs_embeds=None, positions=None, kv_cache=None, cache_update=False,
return_hidden=False, logits_at=None, attn_mask=None)`: causal attention (and `attn_mask`, e.g. left padding), and the logits at position l are about token l + 1, for both
kinds (a shifted network reads each position's own hidden state there, so the last position predicts the next token).

Besides `forward`: `embed_tokens(ids)` (B, T) -> (B, T, C), the input embeddings, and `embed.weight` (V, C), the
embedding matrix they are rows of (process feedback — soft-masking, self-conditioning — builds inputs from it),
`head` (the output layer, which the chunked cross-entropy calls on a chunk of hidden states at a time), and the
properties `context` (the trained length), `vocab_size` (rows of the output layer) and `d_model` (C).

Two memory switches of dlm's `Transformer`, set by the training module (trainer.gradient_checkpointing,
trainer.chunked_ce) and off in a loaded or exported network: `gradient_checkpointing` (each block's activations are
recomputed in the backward; only in training mode with gradients on) and `ce_chunk` (the rows of logits the losses
of MDLM and AR compute at once; 0: all). A network without them is never checkpointed or chunked.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

@runtime_checkable
class Network(Protocol):
    """The interface above; `dlm.network.Transformer` implements it for every family."""

    prediction: str

    @property
    def context(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def d_model(self) -> int: ...

    head: torch.nn.Module  # the output layer: final hidden states (..., C) -> logits (..., V)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def forward(self, input_ids=None, inputs_embeds=None, t=None, attn_mask=None, causal=False, positions=None,
                kv_cache=None, cache_update=False, return_hidden=False, logits_at=None) -> torch.Tensor: ...

    def next_token_logits(self, input_ids=None, inputs_embeds=None, positions=None, kv_cache=None,
                          cache_update=False, return_hidden=False, logits_at=None, attn_mask=None) -> torch.Tensor: ...


def select_positions(x: torch.Tensor, logits_at) -> torch.Tensor:
    """The rows of x (B, T, C) chosen by `logits_at`: None -> (B, T, C); slice -> (B, T', C); bool (B, T) -> (N, C)."""
    if logits_at is None:
        return x
    if isinstance(logits_at, slice):
        return x[:, logits_at]
    if isinstance(logits_at, torch.Tensor) and logits_at.dtype == torch.bool:
        if logits_at.shape != x.shape[:2]:
            raise ValueError(f"logits_at as a bool mask must be (batch, length) = {tuple(x.shape[:2])}; "
                             f"got {tuple(logits_at.shape)}")
        return x[logits_at]
    raise TypeError(f"logits_at must be None, a slice over the positions or a bool (batch, length) tensor; "
                    f"got {type(logits_at).__name__}")


def padding_mask(key_valid: torch.Tensor | None, cached: int = 0) -> torch.Tensor | None:
    """(B, 1, T, cached + T) bool attention mask of a call over positions whose keys are valid where key_valid (B, T)
    is True (False: left padding): every query sees the valid keys, and itself (so a pad's softmax row is never
    empty); the `cached` keys before them are left to the cache's own `key_valid`. None when nothing is padded."""
    if key_valid is None or bool(key_valid.all()):
        return None
    T = key_valid.shape[1]
    own = key_valid[:, None, :] | torch.eye(T, dtype=torch.bool, device=key_valid.device)  # (B, T_q, T_k)
    return torch.nn.functional.pad(own, (cached, 0), value=True)[:, None]


def and_masks(*masks):
    """The conjunction of bool attention masks (broadcastable to (B, nh, T, S)); None ones are ignored."""
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else out & m
    return out


def shift_hidden(x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """The hidden states a shifted network reads at each position: (B, T, C) -> (B, T, C) with row i = x[i - 1].

    previous (B, 1, C): the hidden state just before x (the last cached position), or None at the start of a
    sequence, where position 0 reads its own."""
    first = x[:, :1] if previous is None else previous.to(x.dtype)
    return torch.cat((first, x[:, :-1]), dim=1)
