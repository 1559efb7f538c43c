"""Assemble a model's parts from its config: the network and the process (with soft-masking when enabled).

The one place where `RunConfig` becomes objects, used by training (dlm.train) and loading (dlm.pipeline).
"""

from __future__ import annotations

from dlm.config import RunConfig
from dlm.network import Transformer
from dlm.process import PROCESSES, ModelDescription, Process, make_process
from dlm.softmask.process import SoftMaskedDiffusion


def mask_id_of(cfg: RunConfig, tokenizer=None) -> int | None:
    """The model's mask id: recorded in its config (process.mask_id), else the tokenizer's (models trained
    before it was recorded)."""
    if cfg.process.mask_id >= 0:
        return cfg.process.mask_id
    return None if tokenizer is None else tokenizer.mask_token_id


def describe_model(model_cfg, mask_id: int | None) -> ModelDescription:
    """What a process is told about its model (dlm.process.base.ModelDescription), from the network's config."""
    return ModelDescription(vocab_size=model_cfg.vocab_size, d_model=model_cfg.d_model, mask_id=mask_id,
                            time_conditioning=model_cfg.time_conditioning, context=model_cfg.context)


def build_process(cfg: RunConfig, mask_id: int | None) -> Process:
    """The registered process `cfg.process.name`, built with the model's description (vocabulary size, width,
    mask id, time conditioning, context), wrapped in soft-masking when `cfg.softmask.enabled`."""
    base = make_process(cfg.process, describe_model(cfg.model, mask_id))
    return SoftMaskedDiffusion.from_config(cfg.softmask, base) if cfg.softmask.enabled else base


def build_network(cfg: RunConfig) -> Transformer:
    return Transformer(cfg.model)


def process_for_descriptor(descriptor, model_cfg=None):
    """The process an open checkpoint was trained with, from its model descriptor (dlm.network.families):
    masked diffusion (block diffusion for a block-causal one) with its mask id, or autoregressive for a causal LM,
    described by the network's config `model_cfg` when given. Returns (process, its config)."""
    if descriptor.process is not None:  # the family names it (DiffusionGemma: "diffusion_gemma", its canvas length)
        name, fields = descriptor.process, ({"block_size": descriptor.block_size} if descriptor.block_size else {})
    elif descriptor.corruption == "none" or descriptor.topology == "causal":
        name, fields = "ar", {}
    elif descriptor.topology == "block_causal":
        name, fields = "bd3lm", {"block_size": descriptor.block_size}
    else:
        name, fields = "mdlm", {}
    cfg = PROCESSES[name].config_class(mask_id=-1 if descriptor.mask_id is None else descriptor.mask_id, **fields)
    description = (describe_model(model_cfg, descriptor.mask_id) if model_cfg is not None else
                   ModelDescription(vocab_size=descriptor.vocab_size, mask_id=descriptor.mask_id))
    return make_process(cfg, description), cfg
