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

`process.form=geglu` uses DiffusionGemma's form instead of W (the one udlm and gidd use, dlm/process/uniform.py):
e = rescaled_sum(E[z], GeGLU(RMSNorm(p @ E))), the block's down projection zero at the start (plain MDLM exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlm.process.base import register_process
from dlm.process.feedback import InputFeedback, coin
from dlm.process.mdlm import MaskedDiffusion, MDLMConfig, check_schedule_fields, subs_logits
from dlm.process.schedules import make_schedule


@dataclass
class SelfConditioningConfig(MDLMConfig):
    name: str = "mdlm_sc"
    p_sc: float = 0.5  # probability that a training batch is self-conditioned (two passes)
    form: str = "linear"  # "linear": W (p @ E); "geglu": DiffusionGemma's RMSNorm -> GeGLU block, rescaled sum


class SelfConditioningFeedback(InputFeedback):
    """E[z] + projection(p @ E) at the positions it acts on, from the previous prediction's raw logits there.

    projection: an nn.Module mapping the expected embedding p @ E (N, C) to a change of the input (N, C): W, an
    nn.Linear(C, C) without bias (mdlm_sc), or a `GeGLUSelfConditioning` block (DiffusionGemma's form); mask_id:
    the [MASK] id (None: a model without one), whose logit is never predicted. acts_on: "noise" (the [MASK]
    positions of z: an absorbing process) or "generated" (every position to generate at sampling, every
    corruptible one in training: a process whose noise cannot be told by looking). rescale: the sum
    E[z] + projection(...) is RMS-normalised without a scale and brought back to the RMS of E[z] (DiffusionGemma's
    final RMSNorm, kept at the token embeddings' own scale: see `rescaled_sum`)."""

    label, short = "self-conditioning", "SC"

    def __init__(self, projection: nn.Module, mask_id: int | None, acts_on: str = "noise", rescale: bool = False):
        if acts_on not in ("noise", "generated"):
            raise ValueError(f"acts_on={acts_on!r} must be 'noise' or 'generated'")
        self.projection, self.mask_id, self.acts_on, self.rescale = projection, mask_id, acts_on, rescale

    def positions(self, z: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: where it acts at sampling (fixed (B, L): the given positions)."""
        return z == self.mask_id if self.acts_on == "noise" else ~fixed

    def delta(self, network, z: torch.Tensor, rows: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        """projection(p @ E) scattered to the positions `where` (B, L) of z (default: its [MASK] positions), zero
        elsewhere: (B, L, C); rows (N, V) are the raw logits at those positions (row-major). p and E enter as a
        stop-gradient: differentiable in the projection (and, with rescale, in E[z])."""
        where = z == self.mask_id if where is None else where
        weight = network.embed.weight  # (V, C)
        if weight.shape[1] != self.projection.in_features:
            raise ValueError(f"the self-conditioning projection is {self.projection.in_features} wide but the "
                             f"network's embeddings are {weight.shape[1]}: the process was built for another model")
        with torch.no_grad():
            logits = rows.float() if self.mask_id is None else subs_logits(rows, self.mask_id)
            previous = logits.softmax(-1).to(weight.dtype) @ weight  # (N, C): the expected embedding of the prediction
        projected = self.projection(previous)  # (N, C)
        if self.rescale:
            plain = network.embed_tokens(z)[where]  # (N, C)
            projected = rescaled_sum(plain, projected.to(plain.dtype)) - plain
        index = where.flatten().nonzero().squeeze(-1)  # (N,)
        out = projected.new_zeros(z.numel(), projected.shape[-1]).index_copy(0, index, projected)
        return out.view(*z.shape, -1)

    def offset(self, network, z, logits, fixed, masks_left):
        where = self.positions(z, fixed)  # (B, L)
        return None if not bool(where.any()) else self.delta(network, z, logits[where], where)

    def __call__(self, network, z, logits, fixed, masks_left):
        """Sampling: inputs (B, L, C) for the next call from this step's raw logits (B, L, V), or None."""
        delta = self.offset(network, z, logits, fixed, masks_left)
        if delta is None:
            return None
        embeds = network.embed_tokens(z)
        return embeds + delta.to(embeds.dtype)

    def train_inputs(self, network, z, rows, where=None):
        embeds = network.embed_tokens(z)  # (B, L, C)
        return embeds + self.delta(network, z, rows, where).to(embeds.dtype)

    def train_offset(self, network, z, rows, where=None):
        return self.delta(network, z, rows, where)


def rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(..., 1): the root mean square over the last dimension (float32)."""
    return x.float().pow(2).mean(-1, keepdim=True).add(eps).sqrt()


def rescaled_sum(plain: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(plain + delta) RMS-normalised without a scale, times the RMS of `plain` (N, C): DiffusionGemma's final
    RMSNorm, brought back to the scale of the token embeddings so that delta = 0 gives `plain` exactly (the same
    float operations on the same numbers), i.e. a zero-initialised block starts as the plain model, and the given
    positions, which share the pass in dlm, keep their plain embeddings beside it."""
    total = plain + delta
    return (total.float() * (rms(plain) / rms(total))).to(plain.dtype)


class GeGLUSelfConditioning(nn.Module):
    """DiffusionGemma's self-conditioning block: RMSNorm(p @ E) (with a scale) -> GeGLU MLP (gelu-tanh gate times
    an up projection, then a down projection) -> the change of the input embedding (N, C).

    d_model: the network's width C; hidden: the MLP's width (default C). The down projection starts at zero, so
    the block adds nothing until trained (a model starts plain); the gate and up projections start random (std
    C^-1/2, from a fixed seed: building it draws nothing from the global generator), or no gradient would reach
    them."""

    def __init__(self, d_model: int, hidden: int | None = None, seed: int = 0):
        super().__init__()
        hidden = hidden or d_model
        self.in_features = d_model
        self.norm = nn.Parameter(torch.ones(d_model))
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in (self.gate, self.up):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * d_model ** -0.5)
            self.down.weight.zero_()

    def forward(self, soft: torch.Tensor) -> torch.Tensor:
        """soft (N, C): the expected embedding of the previous prediction -> (N, C)."""
        h = (soft.float() / rms(soft) * self.norm.float()).to(self.gate.weight.dtype)
        return self.down(F.gelu(self.gate(h), approximate="tanh") * self.up(h))


def check_p_sc(p_sc: float) -> None:
    if not 0.0 <= p_sc <= 1.0:
        raise ValueError(f"process.p_sc={p_sc} must be in [0, 1] (the probability that a batch is self-conditioned)")


def check_form(form: str) -> None:
    if form not in ("linear", "geglu"):
        raise ValueError(f"process.form={form!r} must be 'linear' (W (p @ E)) or 'geglu' (DiffusionGemma's block)")


@register_process
class SelfConditionedDiffusion(MaskedDiffusion):
    """MDLM with self-conditioning: the projection W (`projection`, zero at the start) and the p_sc coin."""

    name = "mdlm_sc"
    config_class = SelfConditioningConfig

    def __init__(self, schedule, mask_id: int, d_model: int, p_sc: float = 0.5, sampling_eps: float = 1e-3,
                 antithetic: bool = True, time_conditioning: bool = False, form: str = "linear"):
        super().__init__(schedule, mask_id, sampling_eps, antithetic, time_conditioning)
        check_p_sc(p_sc)
        check_form(form)
        if d_model <= 0:
            raise ValueError("process 'mdlm_sc' sizes its projection by the model's width, which it was not told: "
                             "build it with dlm.process.make_process(cfg, ModelDescription(d_model=..., ...))")
        self.p_sc, self.form = p_sc, form
        if form == "geglu":
            self.projection = GeGLUSelfConditioning(d_model)
        else:
            self.projection = nn.Linear(d_model, d_model, bias=False)
            nn.init.zeros_(self.projection.weight)
        self.last_applied = False  # whether the last training batch was self-conditioned (logged)

    @classmethod
    def from_config(cls, cfg, description):
        return cls(make_schedule(cfg.schedule, cfg.eps), description.mask_id, description.d_model, cfg.p_sc,
                   cfg.sampling_eps, cfg.antithetic, description.time_conditioning, cfg.form)

    @classmethod
    def check_config(cls, cfg) -> None:
        check_schedule_fields(cfg.process)
        check_p_sc(cfg.process.p_sc)
        check_form(cfg.process.form)

    def sc_feedback(self) -> SelfConditioningFeedback:
        return SelfConditioningFeedback(self.projection, self.mask_id, rescale=self.form == "geglu")

    def loss_feedback(self, generator, device, always: bool = False) -> SelfConditioningFeedback | None:
        use = always or coin(generator, device, self.p_sc)
        if not always:
            self.last_applied = use
        return self.sc_feedback() if use else None

    def feedback(self, **overrides) -> SelfConditioningFeedback:
        if overrides:
            raise ValueError(f"self-conditioning takes no sampling options (got {', '.join(sorted(overrides))})")
        return self.sc_feedback()

    def log_values(self) -> dict[str, float]:
        return {"self_conditioning/applied": float(self.last_applied)}
