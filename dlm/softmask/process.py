"""Soft-masking as a process: `SoftMaskedDiffusion` wraps a masked-diffusion process and owns the mixer (its three
learned scalars w) and the two-pass loss (dlm.softmask.training). Because it is a `Process` (an nn.Module), the
mixer is saved, EMA'd, exported and loaded as `process.mixer.*` like any other weight, and training, evaluation
and loading treat it like any process. Sampling-time soft-masking is `SoftMaskFeedback` (an InputFeedback),
built from this process's learned mixer by `feedback(...)`.
"""

from __future__ import annotations

import torch

from dlm.process.base import LossOutput, Process
from dlm.softmask.feedback import SoftMaskFeedback, build_feedback
from dlm.softmask.mixer import SoftMaskMixer
from dlm.softmask.training import check_p_sm, softmask_loss, softmask_nelbo


class SoftMaskedDiffusion(Process):
    """base: an absorbing (masked) diffusion process (MDLM). p_sm: the probability that a training batch gets the
    two-pass soft-masked loss (else the base's plain loss on the same noise). lr: the mixer's own learning rate."""

    name = "softmask"
    corruption = "absorbing"

    def __init__(self, base: Process, mixer: SoftMaskMixer, p_sm: float = 0.8, lr: float = 1e-2):
        self.check_base(type(base))
        check_p_sm(p_sm)
        super().__init__(base.mask_id, base.time_conditioning, base.description)
        self.base, self.mixer, self.p_sm, self.lr = base, mixer, p_sm, lr
        self.default_sampler = base.default_sampler
        self.last_applied = False  # whether the last training batch got soft-masking (logged)

    @staticmethod
    def check_base(base: type[Process]) -> None:
        """Soft-masking softens the [MASK] inputs of a whole-sequence masked diffusion process (MDLM)."""
        if base.corruption != "absorbing" or base.blockwise or base.autoregressive:
            raise ValueError(f"softmask.enabled=true needs process.name=mdlm (masked diffusion), not '{base.name}': "
                             "soft-masking softens the [MASK] inputs of a whole-sequence masked diffusion model")

    @classmethod
    def from_config(cls, cfg, base: Process) -> "SoftMaskedDiffusion":
        """cfg: a SoftMaskConfig (dlm.config)."""
        return cls(base, SoftMaskMixer(cfg.k, cfg.omega_s, cfg.omega_a, cfg.omega_b), cfg.p_sm, cfg.lr)

    # ------------------------------------------------------------------------------------ objective
    def loss(self, network, batch: dict, generator: torch.Generator | None = None) -> LossOutput:
        out, self.last_applied = softmask_loss(self.base, network, self.mixer, batch, generator, self.p_sm)
        return out

    def nelbo(self, network, batch: dict, num_t_samples: int, generator) -> LossOutput:
        """The bound of the two-pass soft-masked denoiser, on the same times and masks as the base's `nelbo`."""
        return softmask_nelbo(self.base, network, self.mixer, batch, num_t_samples, generator)

    def log_values(self) -> dict[str, float]:
        return {**{f"softmask/{k}": v for k, v in self.mixer.omegas().items()}, "softmask/applied": float(self.last_applied)}

    def optimizer_groups(self) -> list[dict]:
        return [{"params": list(self.mixer.parameters()), "lr": self.lr, "weight_decay": 0.0}]

    @property
    def plain(self) -> Process:
        return self.base

    def feedback(self, **overrides) -> SoftMaskFeedback:
        """Sampling-time soft-masking with the learned w (overrides: k, schedule, omega_s, omega_a, omega_b)."""
        return build_feedback(self.mixer, self.mask_id, **overrides)

    # ------------------------------------------------------------------------------------ the base's, unchanged
    def forward_logits(self, network, z, t, batch=None, inputs_embeds=None, **forward):
        return self.base.forward_logits(network, z, t, batch, inputs_embeds, **forward)

    def denoise(self, logits):
        return self.base.denoise(logits)

    def alpha(self, t):
        return self.base.alpha(t)

    def time_of_mask_rate(self, rate):
        return self.base.time_of_mask_rate(rate)

    def __getattr__(self, name: str):
        """Everything else a sampler may read (schedule, sampling_eps, exact_caches, ...) is the base's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)
