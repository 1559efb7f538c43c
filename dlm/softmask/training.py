"""Soft-masking training: two passes on the same noised batch (Hersche et al. 2025, section 3.2).

Draw z_t as MDLM does. Pass 1: the network on z_t without gradients gives logits, from which every masked
position gets its soft embedding e~. Pass 2: the network on those embeddings, with gradients; the NELBO is
computed on pass 2 only, so gradients reach w_s, w_a, w_b through lambda (and the embedding rows mixed in).
Each batch gets soft-masking with probability p_sm, else a plain MDLM pass. Cost of an SM step: one forward
plus one forward-backward, about 4/3 of a plain step.

The loss is `SoftMaskedDiffusion.loss` (the process feedback hook, dlm/process/feedback.py); the functions here
are that loss for a given process and mixer.
"""

from __future__ import annotations

import torch

from dlm.process.mdlm import LossOutput, MaskedDiffusion
from dlm.process.feedback import first_pass_rows
from dlm.softmask.mixer import SoftMaskMixer, check_p_sm
from dlm.softmask.process import SoftMaskedDiffusion

__all__ = ["check_p_sm", "softmask_inputs", "softmask_loss", "softmask_nelbo"]


def softmask_inputs(process: MaskedDiffusion, network, mixer: SoftMaskMixer, z: torch.Tensor, t: torch.Tensor,
                    batch: dict) -> torch.Tensor:
    """Pass 1: the soft-masked input embeddings (B, L, C) for z_t (B, L), differentiable in w and the embedding.

    The network runs on z_t without gradients; its output layer only on the masked positions (the others keep
    E[z]). The denoiser that then reads these embeddings depends on z_t only, so its NELBO is still a bound.
    """
    rows = first_pass_rows(process, network, z, t, batch)  # (N, V)
    return mixer.at_masks(rows, z, process.mask_id, network.embed.weight)


def softmask_loss(process: MaskedDiffusion, network, mixer: SoftMaskMixer, batch: dict,
                  generator: torch.Generator | None, p_sm: float, t: torch.Tensor | None = None
                  ) -> tuple[LossOutput, bool]:
    """The MDLM loss with soft-masking applied with probability p_sm. Returns (loss, whether SM was applied).

    Random numbers are drawn in the order t, z_t (exactly as `process.loss`), then the p_sm coin (only when
    0 < p_sm < 1), so a batch sees the same noise whether or not it gets soft-masking, and p_sm = 0 is
    `process.loss` itself. With SM the loss is pass 2's: the network on the soft inputs, with gradients.
    """
    _check_process(process)
    check_p_sm(p_sm)
    wrapper = SoftMaskedDiffusion(process, mixer, p_sm)
    out = wrapper.loss(network, batch, generator, t)
    return out, wrapper.last_applied


@torch.no_grad()
def softmask_nelbo(process: MaskedDiffusion, network, mixer: SoftMaskMixer, batch: dict, num_t_samples: int,
                   generator: torch.Generator) -> LossOutput:
    """`MaskedDiffusion.nelbo` of the soft-masked denoiser: the same times and masks for the same generator."""
    _check_process(process)
    return SoftMaskedDiffusion(process, mixer).nelbo(network, batch, num_t_samples, generator)


def _check_process(process) -> None:
    if process.corruption != "absorbing" or process.blockwise or process.autoregressive:
        raise ValueError(f"soft-masking needs a masked diffusion process (mdlm), not '{process.name}'")
