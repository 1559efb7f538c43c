"""Processes: how data is noised, the parameterisation and the training objective, one file each behind the
contract of `dlm.process.base.Process`; each registers itself in `PROCESSES`."""

from dlm.process.autoregressive import ARConfig, Autoregressive
from dlm.process.base import PROCESSES, LossOutput, Process, ProcessConfig, register_process
from dlm.process.block_diffusion import BD3LMConfig, BlockDiffusion
from dlm.process.mdlm import MaskedDiffusion, MDLMConfig, nelbo_terms, subs_log_probs, subs_logits
from dlm.process.schedules import NoiseSchedule, make_schedule


def make_process(cfg, mask_id: int | None, time_conditioning: bool = False) -> Process:
    """Build the registered process named by its config (`cfg.name`; cfg: that process's `config_class`)."""
    if cfg.name not in PROCESSES:
        raise ValueError(f"unknown process '{cfg.name}'; valid: {', '.join(sorted(PROCESSES))}")
    return PROCESSES[cfg.name].from_config(cfg, mask_id, time_conditioning)


__all__ = ["PROCESSES", "ARConfig", "Autoregressive", "BD3LMConfig", "BlockDiffusion", "MDLMConfig", "ProcessConfig", "LossOutput", "MaskedDiffusion", "NoiseSchedule", "Process",
           "make_process", "make_schedule", "nelbo_terms", "register_process", "subs_log_probs", "subs_logits"]
