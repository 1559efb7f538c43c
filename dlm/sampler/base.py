"""What every sampler shares: the result type, the sampler interface and float64 categorical sampling."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B, L) generated ids, no [MASK] left
    nfe: int  # network calls (forward passes over the batch)
    seconds: float  # wall time
    trajectory: list[torch.Tensor] = field(default_factory=list)  # (B, L) canvases after each step, if recorded

    @property
    def tokens_per_second(self) -> float:
        return self.tokens.numel() / max(self.seconds, 1e-9)


class Sampler:
    """A sampler denoises a canvas: `sample(network, process, canvas, fixed, generator) -> SampleOutput`.

    canvas (B, L): token ids, with the process's mask id wherever a token is to be generated.
    fixed (B, L) bool: positions that are given (prompt, infill context) and never change; default: every
    position of the canvas that is not [MASK].
    """

    name = "base"

    def sample(self, network, process, canvas: torch.Tensor, fixed: torch.Tensor | None = None,
               generator: torch.Generator | None = None, record_trajectory: bool = False) -> SampleOutput:
        raise NotImplementedError


class InputFeedback:
    """Turns one step's predictions into the next network call's input embeddings (soft-masking does this).

    `__call__(network, z, logits, fixed, masks_left)` gets the canvas z (B, L) after this step's commits, this
    step's raw logits (B, L, V), the fixed positions (B, L) and masks_left (B,): each row's fraction of its
    generated positions still masked (`masked_fraction`; per row, so a row's inputs never depend on the other
    rows of the batch), and returns input embeddings (B, L, C) for the next call, or None for plain token inputs.
    Samplers that leave masks between steps accept `feedback=`; with it, a step that commits nothing still
    changes the inputs, so cached samplers cannot skip a call.
    """

    def __call__(self, network, z, logits, fixed, masks_left: float):
        raise NotImplementedError


def masked_fraction(z: torch.Tensor, mask_id: int, generated: torch.Tensor) -> torch.Tensor:
    """(B,) float: per row, the fraction of its generated positions (generated (B, L) bool) that are still [MASK]."""
    return ((z == mask_id) & generated).sum(1).float() / generated.sum(1).clamp(min=1).float()


def fill_remaining_masks(network, process, z, t_final: float, inputs_embeds=None, logits=None) -> int:
    """The last step of MDLM-style samplers: every [MASK] still in z (B, L) takes the argmax of x_theta, in place.

    `logits`: the raw network logits (B, L, V), reused when still valid for z (a cached sampler), else one
    network call is made at time t_final. Returns the number of network calls made (0 or 1).
    """
    from dlm.process.mdlm import subs_logits  # (a module-level import would be circular)

    remaining = z == process.mask_id
    if not remaining.any():
        return 0
    calls = 0
    if logits is None:
        t = torch.full((z.shape[0],), float(t_final), device=z.device)
        logits = process.forward_logits(network, z, t, {}, inputs_embeds=inputs_embeds)
        calls = 1
    z[remaining] = subs_logits(logits[remaining], process.mask_id).argmax(-1)
    return calls


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def check_sampling_args(temperature: float, top_p: float) -> None:
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]; use 1.0 to turn nucleus filtering off")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Draw one token per row of logits (N, V) by inverse-CDF sampling in float64.

    u (N,) float64 uniforms. Float64 matters: Gumbel-max in float32 behaves like a lowered temperature
    (Zheng et al. 2024). temperature 0 is argmax. top_p < 1 keeps the smallest set of tokens whose
    probability reaches top_p (nucleus), renormalised.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)  # (N, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < top_p  # the top token is always kept
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep_sorted)
    cdf = probs.cumsum(-1)  # (N, V)
    target = (u.clamp_min(1e-12) * cdf[:, -1]).unsqueeze(-1)  # (N, 1); > 0, so zero-probability tokens are never hit
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_max(logits.shape[-1] - 1)
