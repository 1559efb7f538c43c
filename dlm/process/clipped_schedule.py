"""Clipped ("data-driven") noise schedules for block diffusion (Arriola et al. 2025, section 5; SPEC §3).

Training draws the mask rate 1 - alpha_t from an interval [beta, omega] instead of [0, 1]. The interval is chosen
from a grid (widths 0.5..0.9, offsets in steps of 0.05, plus the full range) as the one whose per-block NELBO
estimates have the lowest variance over a few validation batches, with the current (e.g. fine-tuned-from) weights.
Evaluation always uses the full range: clipping changes the training estimator, never the reported bound.

Design: one search before training (`process.clip_search=true`, run by `dlm train`), whose result is written into
`process.clip_low` / `process.clip_high` of the run's config (so it is saved in every checkpoint), logged, and the
whole variance table is written to `<run>/clip_search.json`. (The reference code repeats the search at every
validation; once, from the starting weights, is much cheaper on a CPU and is what the fine-tuning recipe needs.)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from dlm.process.schedules import time_of_mask_rate  # noqa: F401  (re-exported: the clip search uses it)

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


def run_clip_search(cfg, module, tokenizer, run_dir: Path) -> tuple[float, float]:
    """`process.clip_search=true` in `dlm train`: search on `trainer.val_batches` validation batches with the
    module's starting weights, store the interval in cfg.process (saved with every checkpoint), rebuild the
    module's process, rewrite config.yaml, log it and write the table to run_dir/clip_search.json."""
    from dlm.config import ConfigError, to_yaml
    from dlm.process import make_process
    from dlm.train.data_module import load_rows, make_batch

    t = cfg.trainer
    if t.val_batches <= 0:
        raise ConfigError("process.clip_search=true needs validation batches: set trainer.val_batches > 0")
    if not cfg.init_from:
        log.warning("process.clip_search=true without init_from: the search uses randomly initialised weights, "
                    "so the interval it picks says little; the reference recipe searches from an MDLM checkpoint")
    rows = load_rows(cfg, tokenizer, "val")
    batches = []
    for start in range(0, min(len(rows), t.val_batches * t.batch_size), t.batch_size):
        am = None if rows.attention_mask is None else rows.attention_mask[start:start + t.batch_size]
        batches.append(make_batch(rows.input_ids[start:start + t.batch_size].long(), am))
    result = search_clip_interval(module.process, module.network, batches, seed=t.seed)
    cfg.process.clip_low, cfg.process.clip_high = result["best"]
    cfg.process.clip_search = False  # done: the saved config now holds the chosen interval
    module.process = make_process(cfg.process, mask_id=tokenizer.mask_token_id,
                                  time_conditioning=cfg.model.time_conditioning)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "clip_search.json").write_text(json.dumps(
        {"block_size": cfg.process.block_size, "num_batches": len(batches), "best": result["best"],
         "table_beta_omega_variance": result["table"]}, indent=1))
    full = next(v for lo, hi, v in result["table"] if (lo, hi) == (0.0, 1.0))
    log.warning("clip search (block size %d, %d validation batches): mask rate ~ U[%.2f, %.2f], per-block NELBO "
                "variance %.4g (full range: %.4g); table in %s", cfg.process.block_size, len(batches),
                *result["best"], result["table"][0][2], full, run_dir / "clip_search.json")
    return result["best"]


def adopt_saved_interval(cfg, saved_config: dict) -> None:
    """On resume, a run that searched keeps the interval it chose when it started (no second search)."""
    saved = saved_config.get("process", {})
    cfg.process.clip_low = saved.get("clip_low", cfg.process.clip_low)
    cfg.process.clip_high = saved.get("clip_high", cfg.process.clip_high)
    cfg.process.clip_search = saved.get("clip_search", cfg.process.clip_search)
