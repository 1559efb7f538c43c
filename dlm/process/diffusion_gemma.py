"""The process of a DiffusionGemma model (dlm/network/families/diffusion_gemma.py): uniform-state corruption with
x0 prediction and self-conditioning through the network's own block. `process=diffusion_gemma`.

Corruption: each scored token is replaced, with probability t, by a token drawn uniformly from the whole vocabulary
(the prior: every position to generate is a uniform random token; there is no [MASK]). The network's logits are
x0's (`denoise` is the identity, in float32). Sampling feeds each step's logits back (`feedback()`): the next call's
canvas inputs are the network's `self_conditioned_inputs(z, logits)` — softmax(logits)·E·√C through the network's
self-conditioning block, added to the canvas embeddings, then an RMSNorm without scale — exactly the input
transformers' decoder builds from `self_conditioning_logits`. Only a network that has that block can be fed
(`DiffusionGemmaNetwork`); a sampler calls the feedback with whatever logits it feeds back (DiffusionGemma's own
loop feeds the temperature-scaled ones).

Generation is canvas by canvas (`blockwise`, `block_size` = DiffusionGemma's `canvas_length`): the blockwise
sampler encodes the prompt and every finished canvas once into the KV cache (the network's causal encoder) and runs
the inner sampler (`renoise` by default) on each canvas (the network's bidirectional decoder).

Training objective (so that dlm can fine-tune and the contract tests can check it): the x0 cross-entropy
−log p_θ(x0 | z_t) at the scored positions, t ~ U[eps, 1]. It is a reconstruction loss, not a bound on the NLL:
`likelihood = "estimate"`. The uniform-state ELBO (UDLM's) is the `udlm` process's business; this process exists so
that a loaded DiffusionGemma samples with its own parameterisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlm.process.base import LossOutput, Process, ProcessConfig, register_process
from dlm.process.feedback import InputFeedback


@dataclass
class DiffusionGemmaConfig(ProcessConfig):
    name: str = "diffusion_gemma"
    eps: float = 1e-3  # t ~ U[eps, 1]: the probability that a training token is replaced
    block_size: int = 0  # the canvas length (DiffusionGemma's canvas_length, 256; a loaded model's config.json)


class DiffusionGemmaSelfConditioning(InputFeedback):
    """The next call's canvas inputs from this step's logits, through the network's self-conditioning block."""

    label, short = "self-conditioning (DiffusionGemma)", "SC"

    def __call__(self, network, z, logits, fixed, masks_left):
        build = getattr(network, "self_conditioned_inputs", None)
        if build is None:
            raise ValueError(f"DiffusionGemma's self-conditioning needs a network with its self-conditioning block "
                             f"(a loaded DiffusionGemma); {type(network).__name__} has none: sample with "
                             "feedback=False (--no-feedback)")
        return build(z, logits)


@register_process
class DiffusionGemmaProcess(Process):
    """Uniform corruption, x0 logits, the network's self-conditioning as feedback (module docstring)."""

    name, corruption, config_class = "diffusion_gemma", "uniform", DiffusionGemmaConfig
    likelihood = "estimate"
    default_sampler = "renoise"
    blockwise = True  # generated canvas by canvas, finished canvases encoded once into the KV cache
    blocks_after_prompt = True  # the first canvas starts right after the prompt (prompts left-padded to a multiple)
    exact_caches = frozenset({"blockwise"})

    def __init__(self, block_size: int, eps: float = 1e-3, time_conditioning: bool = False):
        super().__init__(None, time_conditioning)
        if block_size < 1:
            raise ValueError(f"process=diffusion_gemma needs process.block_size >= 1, the canvas length (got "
                             f"{block_size}); a loaded DiffusionGemma takes canvas_length from its config.json")
        self.eps, self.block_size = eps, block_size

    @classmethod
    def from_config(cls, cfg, description):
        return cls(cfg.block_size, cfg.eps, description.time_conditioning)

    @classmethod
    def check_config(cls, cfg) -> None:
        if not 0.0 <= cfg.process.eps < 1.0:
            raise ValueError(f"process.eps={cfg.process.eps} must be in [0, 1)")
        if cfg.process.block_size < 1:
            raise ValueError(f"process=diffusion_gemma needs process.block_size >= 1 (the canvas length); got "
                             f"{cfg.process.block_size}")

    def feedback(self, **overrides) -> DiffusionGemmaSelfConditioning:
        if overrides:
            raise ValueError(f"DiffusionGemma's self-conditioning takes no options (got {', '.join(sorted(overrides))})")
        return DiffusionGemmaSelfConditioning()

    def alpha(self, t):
        return 1.0 - torch.as_tensor(t)  # the probability that a token is still clean

    def time_of_mask_rate(self, rate):
        return torch.as_tensor(rate, dtype=torch.float64)

    def corrupt(self, x, loss_mask, generator):
        """(t (B,), z_t (B, L)): each row's time and draws from its own generator when given one per row."""
        if isinstance(generator, (list, tuple)):
            parts = [self.corrupt(x[r:r + 1], loss_mask[r:r + 1], g) for r, g in enumerate(generator)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        B, L = x.shape
        t = self.eps + (1.0 - self.eps) * torch.rand(B, generator=generator, device=x.device)
        replace = (torch.rand(B, L, generator=generator, device=x.device) < t[:, None]) & loss_mask
        noise = torch.randint(self.vocab_size, (B, L), generator=generator, device=x.device)
        return t, torch.where(replace, noise, x)

    def loss(self, network, batch, generator=None) -> LossOutput:
        batch = self.honour_given(batch)
        x, loss_mask = batch["input_ids"], batch["loss_mask"]
        t, z = self.corrupt(x, loss_mask, generator)
        logits = self.denoise(self.forward_logits(network, z, t, batch, logits_at=loss_mask))  # (N, V)
        ce = F.cross_entropy(logits, x[loss_mask], reduction="none")  # (N,)
        per_row = torch.zeros(x.shape[0], dtype=ce.dtype, device=x.device).index_add(
            0, loss_mask.nonzero()[:, 0], ce)  # (B,)
        total, count = per_row.sum(), loss_mask.sum()
        return LossOutput(total / count.clamp(min=1), total.detach(), count.detach(), per_row.detach(), loss_mask.sum(1))

    @torch.no_grad()
    def nelbo(self, network, batch, num_t_samples, generator) -> LossOutput:
        """The mean over `num_t_samples` draws of the reconstruction loss (an estimate, not a bound)."""
        batch = self.honour_given(batch)
        per_row = 0.0
        for _ in range(num_t_samples):
            per_row = per_row + self.loss(network, batch, generator).nll_per_row.double()
        per_row = per_row / num_t_samples
        tokens = batch["loss_mask"].sum(1)
        return LossOutput(per_row.sum() / tokens.sum().clamp(min=1), per_row.sum(), tokens.sum(), per_row, tokens)
