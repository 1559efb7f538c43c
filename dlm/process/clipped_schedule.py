"""Clipped ("data-driven") noise schedules for block diffusion (Arriola et al. 2025, section 5; SPEC §3).

Training draws the mask rate 1 - alpha_t from an interval [beta, omega] instead of [0, 1]. The interval is chosen
from a grid (widths 0.5..0.9, offsets in steps of 0.05, plus the full range) as the one whose per-block NELBO
estimates have the lowest variance over a few validation batches, with the current (e.g. fine-tuned-from) weights.
Evaluation always uses the full range: clipping changes the training estimator, never the reported bound.

Design: one search before training (`process.clip_search=true`, run by `dlm train`: dlm/train/clip_search.py), whose result is written into
`process.clip_low` / `process.clip_high` of the run's config (so it is saved in every checkpoint), logged, and the
whole variance table is written to `<run>/clip_search.json`. (The reference code repeats the search at every
validation; once, from the starting weights, is much cheaper on a CPU and is what the fine-tuning recipe needs.)
"""

from __future__ import annotations

import logging

import torch


log = logging.getLogger("dlm")


def clip_grid(widths=(0.5, 0.6, 0.7, 0.8, 0.9), step: float = 0.05) -> list[tuple[float, float]]:
    """The candidate mask-rate intervals [beta, omega]: each width, every offset in steps of `step` that keeps
    the interval inside [0, 1], and the full range (0, 1) for reference."""
    grid = []
    for w in widths:
        n = int(round((1.0 - w) / step))
        grid += [(round(i * step, 4), round(i * step + w, 4)) for i in range(n + 1)]
    return grid + [(0.0, 1.0)]


@torch.no_grad()
def per_block_nelbo_variance(process, network, batches: list[dict], interval: tuple[float, float],
                             seed: int = 0) -> float:
    """Sum over batches of the variance of the per-block NELBO estimates (B * num_blocks values per batch), with
    mask rates drawn in `interval`. The same seed for every interval (common random numbers) makes the
    comparison between intervals far less noisy than independent draws."""
    clipped = process.with_clip(*interval)
    generator = torch.Generator(device=batches[0]["input_ids"].device).manual_seed(seed)
    total = 0.0
    for batch in batches:
        per_block = clipped.per_block_nelbo(network, batch, generator)  # (B, num_blocks)
        total += float(per_block.double().var())
    return total


def search_clip_interval(process, network, batches: list[dict], grid=None, seed: int = 0) -> dict:
    """Evaluate every interval of the grid; returns {"best": (beta, omega), "table": [[beta, omega, var], ...]}
    with the table sorted by variance (lowest first)."""
    if not batches:
        raise ValueError("the clip search needs at least one validation batch")
    was_training = network.training
    network.eval()
    try:
        table = [[lo, hi, per_block_nelbo_variance(process, network, batches, (lo, hi), seed)]
                 for lo, hi in (grid or clip_grid())]
    finally:
        network.train(was_training)
    table.sort(key=lambda row: row[2])
    return {"best": (table[0][0], table[0][1]), "table": table}
