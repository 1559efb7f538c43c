"""Soft-masking as a process: `SoftMaskedDiffusion` wraps a masked-diffusion process and owns the mixer (its three
learned scalars w). Because it is a `Process` (an nn.Module), the mixer is saved, EMA'd, exported and loaded as
`process.mixer.*` like any other weight, and training, evaluation and loading treat it like any process.

It is a feedback process (dlm/process/feedback.py): in training, `loss_feedback` gives a batch soft-masking with
probability p_sm (the two-pass loss: pass 1 without gradients on z_t, pass 2 on the soft-masked embeddings); at
sampling, `feedback(...)` is `SoftMaskFeedback` with the learned w. A base process with a feedback of its own
(self-conditioning) keeps it: the two are combined, soft-masking first.
"""

from __future__ import annotations

import torch

from dlm.process.base import LossOutput, Process
from dlm.process.feedback import InputFeedback, coin, combine, second_pass_inputs
from dlm.softmask.feedback import SoftMaskFeedback, build_feedback
from dlm.softmask.mixer import SoftMaskMixer, check_p_sm


class SoftMaskedDiffusion(Process):
    """base: an absorbing (masked) diffusion process (MDLM). p_sm: the probability that a training batch gets the
    two-pass soft-masked loss (else the base's own loss on the same noise). lr: the mixer's own learning rate."""

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
    def loss(self, network, batch: dict, generator: torch.Generator | None = None,
             t: torch.Tensor | None = None) -> LossOutput:
        """The base's loss with this process's feedback hook: random draws t, z_t, the p_sm coin (only when
        0 < p_sm < 1), then the base's own coin; p_sm = 0 on a plain base is the base's loss itself."""
        return self.base.loss(network, batch, generator, t,
                              embed_fn=lambda z, t: second_pass_inputs(self, network, batch, z, t, generator))

    def nelbo(self, network, batch: dict, num_t_samples: int, generator) -> LossOutput:
        """The bound of the two-pass soft-masked denoiser, on the same times and masks as the base's `nelbo`."""
        return self.base.nelbo(network, batch, num_t_samples, generator, embed_fn=lambda z, t: second_pass_inputs(
            self, network, batch, z, t, generator, always=True))

    def loss_feedback(self, generator, device, always: bool = False) -> InputFeedback | None:
        """Soft-masking with probability p_sm (always: every time), combined with the base's own."""
        use = always or coin(generator, device, self.p_sm)
        if not always:
            self.last_applied = use
        return combine(SoftMaskFeedback(self.mixer, self.mask_id) if use else None,
                       self.base.loss_feedback(generator, device, always))

    def log_values(self) -> dict[str, float]:
        return {**{f"softmask/{k}": v for k, v in self.mixer.omegas().items()},
                "softmask/applied": float(self.last_applied), **self.base.log_values()}

    def optimizer_groups(self) -> list[dict]:
        return [{"params": list(self.mixer.parameters()), "lr": self.lr, "weight_decay": 0.0},
                *self.base.optimizer_groups()]

    @property
    def plain(self) -> Process:
        return self.base

    def feedback(self, **overrides) -> InputFeedback:
        """Sampling-time soft-masking with the learned w (overrides: k, schedule, omega_s, omega_a, omega_b),
        combined with the base's own feedback (if any)."""
        return combine(build_feedback(self.mixer, self.mask_id, **overrides), self.base.feedback())

    # ------------------------------------------------------------------------------------ the base's, unchanged
    def forward_logits(self, network, z, t, batch=None, inputs_embeds=None, **forward):
        return self.base.forward_logits(network, z, t, batch, inputs_embeds, **forward)

    def denoise(self, logits):
        return self.base.denoise(logits)

    def alpha(self, t):
        return self.base.alpha(t)

    def time_of_mask_rate(self, rate):
        return self.base.time_of_mask_rate(rate)

    def log_score(self, logits, z, t):
        return self.base.log_score(logits, z, t)

    def total_noise(self, t):
        return self.base.total_noise(t)

    def noise_rate(self, t):
        return self.base.noise_rate(t)

    def __getattr__(self, name: str):
        """Everything else a sampler may read (schedule, sampling_eps, exact_caches, ...) is the base's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)
