"""Cross-entropy over the vocabulary, a chunk of positions at a time: the (N, V) logits never exist at once.

The loss of N scored positions needs their logits, (N, V) floats: at 2,048 positions and LLaDA's 126,464 tokens
that is 1 GiB in float32, kept for the backward with its log-softmax (about as much again) and followed by its
gradient. Here the output layer runs on `chunk` positions at a time, each chunk's cross-entropy is computed and its
logits dropped; the backward recomputes one chunk's logits at a time (torch.utils.checkpoint, non-reentrant), so the
peak holds one (chunk, V) block. The cost: the output layer runs twice per chunk (forward, then again in backward).

`mask_id` is the SUBS parameterisation of masked diffusion (the [MASK] logit set to -inf before the log-softmax, as
dlm.process.mdlm.subs_logits does); None is the plain cross-entropy (autoregressive). Both in float32, as the
unchunked losses compute them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def chunk_size(network) -> int:
    """The rows of logits a loss computes at once for `network` (its `ce_chunk`, set from trainer.chunked_ce);
    0: all at once. A network without the attribute (one built outside dlm) is never chunked."""
    return int(getattr(network, "ce_chunk", 0) or 0)


def _chunk_ce(head, hidden: torch.Tensor, targets: torch.Tensor, mask_id: int | None) -> torch.Tensor:
    """-log softmax(head(hidden))[targets] for one chunk: hidden (n, C), targets (n,) -> (n,) float32."""
    logits = head(hidden).float()  # (n, V)
    if mask_id is not None:  # SUBS zero-masking: x_theta never predicts [MASK]
        logits = logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
    return F.cross_entropy(logits, targets, reduction="none")


def chunked_cross_entropy(hidden: torch.Tensor, head, targets: torch.Tensor, chunk: int,
                          mask_id: int | None = None) -> torch.Tensor:
    """Per-position cross-entropy (N,) float32 of the logits head(hidden) against targets, `chunk` rows at a time.

    hidden (N, C): the final hidden states at the scored positions (network(..., return_hidden=True, logits_at=...));
    head: the network's output layer, (n, C) -> (n, V); targets (N,) token ids; mask_id: SUBS (see the module's
    docstring) or None. Equals F.cross_entropy(head(hidden).float(), targets, reduction="none") (with the [MASK]
    column at -inf under SUBS), up to float rounding, and so do its gradients.
    """
    if chunk <= 0:
        raise ValueError(f"chunk={chunk} must be a positive number of positions")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, C) and targets (N,); got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if hidden.shape[0] == 0:  # nothing scored: an empty (0,) still joined to the graph, as the unchunked loss's
        return _chunk_ce(head, hidden, targets, mask_id)
    recompute = torch.is_grad_enabled()  # without gradients nothing is kept: each chunk is computed and dropped
    out = []
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], targets[start:start + chunk]
        out.append(checkpoint(_chunk_ce, head, h, y, mask_id, use_reentrant=False) if recompute
                   else _chunk_ce(head, h, y, mask_id))
    return torch.cat(out)  # (N,)
