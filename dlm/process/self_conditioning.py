"""Self-conditioning (Chen et al. 2022, "Analog Bits", arXiv 2208.04202; used by CDCD, Plaid and SEDD-style
models): MDLM whose denoiser also reads its own previous prediction of the clean tokens. `process=mdlm_sc`.

At a noise position of z_t the network's input becomes

    e = E[z] + W (p @ E),    p = x_theta of the previous prediction (softmax of its SUBS logits, (V,)),

with E (V, C) the network's embedding matrix and W (C, C) a learned projection sized by the model's width
(`ModelDescription.d_model`) and initialised to zero: W = 0 is plain MDLM exactly, so a model starts as one.
Clean positions keep E[z] (x_theta there is the one-hot of z itself, which their input already is).

Training: with probability p_sc a batch runs a first pass on z_t without gradients and feeds its prediction
(a stop-gradient input, as in the paper) to the loss pass; otherwise the previous prediction is zero, which is
the plain pass. Random draws: t, z_t, then the p_sc coin (only when 0 < p_sc < 1). The NELBO used for evaluation
feeds it at every time: a two-pass denoiser that depends on z_t only, so still a bound. Sampling (`feedback()`,
attached by `DiffusionLM.generate` by default): each network call is fed the prediction of the previous call
(the first call gets none). W is a process parameter: saved, EMA'd, exported and optimised like the network's.
Soft-masking (`softmask.enabled=true`) on top of it combines both feedbacks (dlm/process/feedback.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dlm.process.base import register_process
from dlm.process.feedback import InputFeedback, coin
from dlm.process.mdlm import MaskedDiffusion, MDLMConfig, check_schedule_fields, subs_logits
from dlm.process.schedules import make_schedule


@dataclass
class SelfConditioningConfig(MDLMConfig):
    name: str = "mdlm_sc"
    p_sc: float = 0.5  # probability that a training batch is self-conditioned (two passes)


class SelfConditioningFeedback(InputFeedback):
    """E[z] + W (p @ E) at the noise positions of z, from the previous prediction's raw logits there.

    projection: W, an nn.Linear(C, C) without bias (the process's); mask_id: the [MASK] id."""

    label, short = "self-conditioning", "SC"

    def __init__(self, projection: nn.Linear, mask_id: int):
        self.projection, self.mask_id = projection, mask_id

    def delta(self, network, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """W (p @ E) scattered to the masked positions of z (B, L), zero elsewhere: (B, L, C); rows (N, V) are the
        raw logits at those positions (row-major). Differentiable in W only (p and E enter as a stop-gradient)."""
        weight = network.embed.weight  # (V, C)
        if weight.shape[1] != self.projection.in_features:
            raise ValueError(f"the self-conditioning projection is {self.projection.in_features} wide but the "
                             f"network's embeddings are {weight.shape[1]}: the process was built for another model")
        with torch.no_grad():
            p = subs_logits(rows, self.mask_id).softmax(-1)  # (N, V) float32; 0 at [MASK]
            previous = p.to(weight.dtype) @ weight  # (N, C): the expected embedding of the prediction
        projected = self.projection(previous)  # (N, C)
        index = (z == self.mask_id).flatten().nonzero().squeeze(-1)  # (N,)
        out = projected.new_zeros(z.numel(), projected.shape[-1]).index_copy(0, index, projected)
        return out.view(*z.shape, -1)

    def offset(self, network, z, logits, fixed, masks_left):
        masked = z == self.mask_id  # (B, L)
        return None if not bool(masked.any()) else self.delta(network, z, logits[masked])

    def __call__(self, network, z, logits, fixed, masks_left):
        """Sampling: inputs (B, L, C) for the next call from this step's raw logits (B, L, V), or None."""
        delta = self.offset(network, z, logits, fixed, masks_left)
        if delta is None:
            return None
        embeds = network.embed_tokens(z)
        return embeds + delta.to(embeds.dtype)

    def train_inputs(self, network, z, rows):
        embeds = network.embed_tokens(z)  # (B, L, C)
        return embeds + self.delta(network, z, rows).to(embeds.dtype)

    def train_offset(self, network, z, rows):
        return self.delta(network, z, rows)


def check_p_sc(p_sc: float) -> None:
    if not 0.0 <= p_sc <= 1.0:
        raise ValueError(f"process.p_sc={p_sc} must be in [0, 1] (the probability that a batch is self-conditioned)")


@register_process
class SelfConditionedDiffusion(MaskedDiffusion):
    """MDLM with self-conditioning: the projection W (`projection`, zero at the start) and the p_sc coin."""

    name = "mdlm_sc"
    config_class = SelfConditioningConfig

    def __init__(self, schedule, mask_id: int, d_model: int, p_sc: float = 0.5, sampling_eps: float = 1e-3,
                 antithetic: bool = True, time_conditioning: bool = False):
        super().__init__(schedule, mask_id, sampling_eps, antithetic, time_conditioning)
        check_p_sc(p_sc)
        if d_model <= 0:
            raise ValueError("process 'mdlm_sc' sizes its projection by the model's width, which it was not told: "
                             "build it with dlm.process.make_process(cfg, ModelDescription(d_model=..., ...))")
        self.p_sc = p_sc
        self.projection = nn.Linear(d_model, d_model, bias=False)
        nn.init.zeros_(self.projection.weight)
        self.last_applied = False  # whether the last training batch was self-conditioned (logged)

    @classmethod
    def from_config(cls, cfg, description):
        return cls(make_schedule(cfg.schedule, cfg.eps), description.mask_id, description.d_model, cfg.p_sc,
                   cfg.sampling_eps, cfg.antithetic, description.time_conditioning)

    @classmethod
    def check_config(cls, cfg) -> None:
        check_schedule_fields(cfg.process)
        check_p_sc(cfg.process.p_sc)

    def loss_feedback(self, generator, device, always: bool = False) -> SelfConditioningFeedback | None:
        use = always or coin(generator, device, self.p_sc)
        if not always:
            self.last_applied = use
        return SelfConditioningFeedback(self.projection, self.mask_id) if use else None

    def feedback(self, **overrides) -> SelfConditioningFeedback:
        if overrides:
            raise ValueError(f"self-conditioning takes no sampling options (got {', '.join(sorted(overrides))})")
        return SelfConditioningFeedback(self.projection, self.mask_id)

    def log_values(self) -> dict[str, float]:
        return {"self_conditioning/applied": float(self.last_applied)}
