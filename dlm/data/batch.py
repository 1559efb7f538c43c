"""The batch every process reads: a dict of token ids and the masks of what is scored and what is attended to."""

from __future__ import annotations

import torch


def make_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               score_mask: torch.Tensor | None = None) -> dict:
    """The batch dict the processes read: ids (B, L), loss_mask (B, L) (not BOS at position 0, not padding, and
    within `score_mask` (B, L) bool when given: e.g. only a response after its prompt), attention_mask (B, L) or
    absent."""
    loss_mask = torch.ones_like(input_ids, dtype=torch.bool)
    loss_mask[:, 0] = False  # position 0 is BOS: given, never predicted (by the diffusion or the AR model)
    if score_mask is not None:
        loss_mask &= score_mask
    batch = {"input_ids": input_ids, "loss_mask": loss_mask}
    if attention_mask is not None:
        batch["loss_mask"] = loss_mask & attention_mask
        batch["attention_mask"] = attention_mask
    return batch
