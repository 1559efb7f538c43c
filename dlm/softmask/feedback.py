"""Soft-masking as a feedback (dlm/process/feedback.py): the `InputFeedback` that samplers call after each step's
commits, and that the two-pass training loss feeds its second pass with (`train_inputs`).

After a step, every position that is still [MASK] gets e~ built from this step's logits, and the next network
call (including the final argmax call) reads those embeddings. Inference schedules scale w_s by the fraction
of the row's generated positions still masked (per row, so a sequence never depends on its batch):
  none      w_s
  linear    w_s * masks_left            (feedback fades out as the canvas fills)
  stepwise  w_s while masks_left >= 1/2, then 0
"""

from __future__ import annotations

import torch

from dlm.process.feedback import InputFeedback
from dlm.softmask.mixer import SoftMaskMixer, check_omegas

SCHEDULES = ("none", "linear", "stepwise")


def schedule_scale(schedule: str, masks_left):
    """The factor applied to w_s when a fraction `masks_left` in [0, 1] of the generated positions is masked.

    masks_left: a float, or a tensor (B,) of per-row fractions (the factor is then a tensor (B,) too)."""
    if schedule == "none":
        return torch.ones_like(masks_left) if torch.is_tensor(masks_left) else 1.0
    if schedule == "linear":
        return masks_left
    if schedule == "stepwise":
        return (masks_left >= 0.5).to(masks_left.dtype) if torch.is_tensor(masks_left) else float(masks_left >= 0.5)
    raise ValueError(f"unknown soft-masking schedule '{schedule}'; valid: {', '.join(SCHEDULES)}")


class SoftMaskFeedback(InputFeedback):
    """Soft-masking for any sampler that accepts `feedback=`.

    mixer: a trained `SoftMaskMixer` (its k and learned w), or a fresh one for training-free use.
    omega_s / omega_a / omega_b: optional sampling-time overrides of the mixer's values.
    schedule: "none" | "linear" | "stepwise" (see the module docstring).
    """

    label, short = "soft-masking", "SM"

    def __init__(self, mixer: SoftMaskMixer, mask_id: int, schedule: str = "none", omega_s: float | None = None,
                 omega_a: float | None = None, omega_b: float | None = None):
        schedule_scale(schedule, 1.0)  # validates the name
        check_omegas(omega_s, omega_a, omega_b)
        self.mixer, self.mask_id, self.schedule = mixer, mask_id, schedule
        self.omega_s, self.omega_a, self.omega_b = omega_s, omega_a, omega_b

    def omegas(self) -> dict[str, float]:
        """The w actually used (overrides applied), before the schedule."""
        w = self.mixer.omegas()
        for name in w:
            if getattr(self, name) is not None:
                w[name] = float(getattr(self, name))
        return w

    @torch.no_grad()
    def __call__(self, network, z, logits, fixed, masks_left):
        """Input embeddings (B, L, C) for the next call, or None when nothing is masked or w_s is scheduled to 0.

        masks_left (B,) (or a float for every row): each row's fraction of generated positions still masked."""
        masked = z == self.mask_id  # (B, L)
        scale = torch.as_tensor(schedule_scale(self.schedule, masks_left), dtype=torch.float32,
                                device=z.device).expand(z.shape[0])  # (B,)
        if not (scale[masked.any(1)] > 0).any():
            return None  # identical to feeding E[m]: the next call takes token ids
        w = self.omegas()
        omega_s = (w["omega_s"] * scale)[:, None].expand_as(z)[masked]  # (N,): per masked position, row-major
        return self.mixer(logits, z, self.mask_id, network.embed.weight,
                          omega_s=omega_s, omega_a=w["omega_a"], omega_b=w["omega_b"])

    def train_inputs(self, network, z, rows, where=None):
        """Training (pass 2's inputs): every masked position of z (B, L) gets e~ from the first pass's logits rows
        (N, V) there (`where`, when given, is those masked positions); differentiable in the mixer's w (overrides,
        when set, replace them) and the embedding."""
        return self.mixer.at_masks(rows, z, self.mask_id, network.embed.weight, self.omega_s, self.omega_a,
                                   self.omega_b)


def build_feedback(trained: SoftMaskMixer | None, mask_id: int, k: int | None = None, schedule: str = "none",
                   omega_s: float | None = None, omega_a: float | None = None,
                   omega_b: float | None = None) -> SoftMaskFeedback:
    """Soft-masking feedback for sampling: with the learned w of `trained`, or training-free with chosen w.

    A model trained without soft-masking (`trained` None) has no learned w_s, so omega_s must be given;
    omega_a and omega_b then default to their initial values (6.67, -0.75). k overrides the mixer's k.
    """
    if trained is None:
        if omega_s is None:
            raise ValueError("this model was trained without soft-masking, so it has no learned omega_s; choose one "
                             "for training-free use, e.g. softmask=dict(omega_s=0.5) or --omega-s 0.5")
        mixer = SoftMaskMixer(k=3 if k is None else k)
    elif k is not None and k != trained.k:
        mixer = SoftMaskMixer(k=k)
        mixer.load_state_dict(trained.state_dict())
    else:
        mixer = trained
    return SoftMaskFeedback(mixer, mask_id, schedule, omega_s, omega_a, omega_b)
