"""Processes: how data is noised, the parameterisation and the training objective, one file each behind the
contract of `dlm.process.base.Process`; each registers itself in `PROCESSES`, which imports every module of this
package (and the dlm.plugins entry points) when first read: a new process needs no import line here. The names
below are re-exported for convenience."""

from dlm.process.autoregressive import ARConfig, Autoregressive
from dlm.process.base import PROCESSES, LossOutput, ModelDescription, Process, ProcessConfig, register_process
from dlm.process.block_diffusion import BD3LMConfig, BlockDiffusion
from dlm.process.mdlm import MaskedDiffusion, MDLMConfig, nelbo_terms, subs_log_probs, subs_logits
from dlm.process.schedules import NoiseSchedule, make_schedule


def make_process(cfg, description: ModelDescription | int | None, time_conditioning: bool = False) -> Process:
    """Build the registered process named by its config (`cfg.name`; cfg: that process's `config_class`) for the
    model `description` (a ModelDescription; a mask id (or None) with `time_conditioning` stands for a description
    that knows nothing else, as callers before ModelDescription passed)."""
    if cfg.name not in PROCESSES:
        raise ValueError(f"unknown process '{cfg.name}'; valid: {', '.join(sorted(PROCESSES))}")
    if not isinstance(description, ModelDescription):
        description = ModelDescription(mask_id=description, time_conditioning=time_conditioning)
    process = PROCESSES[cfg.name].from_config(cfg, description)
    process.description = description
    return process


__all__ = ["PROCESSES", "ARConfig", "Autoregressive", "BD3LMConfig", "BlockDiffusion", "MDLMConfig", "ProcessConfig", "LossOutput", "MaskedDiffusion", "ModelDescription", "NoiseSchedule", "Process",
           "make_process", "make_schedule", "nelbo_terms", "register_process", "subs_log_probs", "subs_logits"]
