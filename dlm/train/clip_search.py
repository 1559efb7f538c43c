"""`process.clip_search=true` in `dlm train`: the BD3-LM clipped-schedule search (dlm.process.clipped_schedule)
run once before training, its interval stored in the run's config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dlm.build import build_process, mask_id_of
from dlm.config import ConfigError, to_yaml
from dlm.process.clipped_schedule import search_clip_interval
from dlm.train.data_module import validation_batches

log = logging.getLogger("dlm")


def run_clip_search(cfg, module, tokenizer, run_dir: Path) -> tuple[float, float]:
    """`process.clip_search=true` in `dlm train`: search on `trainer.val_batches` validation batches with the
    module's starting weights, store the interval in cfg.process (saved with every checkpoint), rebuild the
    module's process, rewrite config.yaml, log it and write the table to run_dir/clip_search.json."""
    t = cfg.trainer
    if t.val_batches <= 0:
        raise ConfigError("process.clip_search=true needs validation batches: set trainer.val_batches > 0")
    if not cfg.init_from:
        log.warning("process.clip_search=true without init_from: the search uses randomly initialised weights, "
                    "so the interval it picks says little; the reference recipe searches from an MDLM checkpoint")
    batches = validation_batches(cfg, tokenizer)
    result = search_clip_interval(module.process, module.network, batches, seed=t.seed)
    cfg.process.clip_low, cfg.process.clip_high = result["best"]
    cfg.process.clip_search = False  # done: the saved config now holds the chosen interval
    module.process = build_process(cfg, mask_id_of(cfg, tokenizer))
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
