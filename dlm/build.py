"""Assemble a model's parts from its config: the network and the process (with soft-masking when enabled).

The one place where `RunConfig` becomes objects, used by training (dlm.train) and loading (dlm.pipeline).
"""

from __future__ import annotations

from dlm.config import RunConfig
from dlm.network import Transformer
from dlm.process import Process, make_process
from dlm.softmask.process import SoftMaskedDiffusion


def mask_id_of(cfg: RunConfig, tokenizer=None) -> int | None:
    """The model's mask id: recorded in its config (process.mask_id), else the tokenizer's (models trained
    before it was recorded)."""
    if cfg.process.mask_id >= 0:
        return cfg.process.mask_id
    return None if tokenizer is None else tokenizer.mask_token_id


def build_process(cfg: RunConfig, mask_id: int | None) -> Process:
    """The registered process `cfg.process.name`, wrapped in soft-masking when `cfg.softmask.enabled`."""
    base = make_process(cfg.process, mask_id, cfg.model.time_conditioning)
    return SoftMaskedDiffusion.from_config(cfg.softmask, base) if cfg.softmask.enabled else base


def build_network(cfg: RunConfig) -> Transformer:
    return Transformer(cfg.model)
