"""MDLM: masked diffusion with the SUBS parameterisation and the Rao-Blackwellised continuous-time NELBO.

Forward process: each token independently stays itself with probability alpha_t, else becomes [MASK].
Training minimises  E_t [ w(t) * sum over masked positions of -log x_theta(z_t)[x] ],  w(t) = -alpha'_t/(1-alpha_t)
(Sahoo et al. 2024, arXiv 2406.07524, eq. 10-11).

Batches are dicts: `input_ids` (B, L) and `loss_mask` (B, L) bool — the positions that are noised and
scored (not BOS, not padding) — plus an optional `attention_mask` (B, L) bool for padded rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlm.network.chunked_ce import chunk_size, chunked_cross_entropy
from dlm.process.base import LossOutput, Process, ProcessConfig, register_process
from dlm.process.feedback import second_pass_inputs
from dlm.process.schedules import SCHEDULES, NoiseSchedule, make_schedule, time_of_mask_rate


def subs_logits(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Zero-masking: the [MASK] logit becomes -inf, so x_theta never predicts [MASK]. Returns float32 (B, L, V)."""
    out = logits.float()
    if out is logits:  # never modify the caller's tensor in place
        out = out.clone()
    out[..., mask_id] = float("-inf")
    return out


def subs_log_probs(logits: torch.Tensor, z: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Full SUBS: log x_theta (B, L, V). Zero-masking, and carry-over: a clean z^l gives the one-hot of z^l."""
    log_probs = subs_logits(logits, mask_id).log_softmax(-1)
    clean = z != mask_id  # (B, L)
    carry = torch.full_like(log_probs, float("-inf")).scatter_(-1, z.unsqueeze(-1), 0.0)
    return torch.where(clean.unsqueeze(-1), carry, log_probs)


def uniform(shape: tuple[int, ...], generator, device) -> torch.Tensor:
    """torch.rand(shape); `generator` may also be a list of one generator per row (shape[0] of them), so that
    each row's draws do not depend on the batch it is in (evaluation: the bound of a text is the same at any
    batch size)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} per-row generators for {shape[0]} rows")
        return torch.cat([torch.rand((1, *shape[1:]), generator=g, device=device) for g in generator])
    return torch.rand(shape, generator=generator, device=device)


def antithetic_times(batch: int, sampling_eps: float, generator: torch.Generator | None, device, antithetic=True):
    """t (B,) in [sampling_eps, 1]: t_i = (u + i/B) mod 1 for one shared u (low-discrepancy), then rescaled."""
    if antithetic:
        u = torch.rand(1, generator=generator, device=device)
        t = (u + torch.arange(batch, device=device) / batch) % 1.0
    else:
        t = torch.rand(batch, generator=generator, device=device)
    return (1.0 - sampling_eps) * t + sampling_eps


def evaluation_times(shape: tuple[int, ...], num_t_samples: int, sampling_eps: float,
                     generator: torch.Generator | None, device) -> torch.Tensor:
    """(*shape, n) times for a Monte Carlo NELBO: each unit (a sequence, or a block) gets n antithetic times
    (u + j/n) mod 1 from its own u, rescaled to [sampling_eps, 1]."""
    u = uniform((*shape, 1), generator, device)  # generator: one, or a list of one per row
    times = (u + torch.arange(num_t_samples, device=device) / num_t_samples) % 1.0
    return (1.0 - sampling_eps) * times + sampling_eps


def nelbo_terms(logits, x, z, t, schedule: NoiseSchedule, mask_id: int, loss_mask) -> torch.Tensor:
    """Per-token NELBO terms (B, L): w(t) * -log x_theta(z_t)[x] where z_t is masked, 0 elsewhere.

    logits (B, L, V) from the network on z (B, L); x (B, L) clean ids; t (B,); loss_mask (B, L) bool.
    Carry-over makes unmasked positions contribute exactly 0, so only masked positions are scored.
    """
    masked = (z == mask_id) & loss_mask  # (B, L)
    ce = F.cross_entropy(subs_logits(logits, mask_id).flatten(0, 1), x.flatten(), reduction="none").view_as(x)  # (B, L)
    return torch.where(masked, ce, 0.0) * schedule.loss_weight(t)[:, None]


def check_schedule_fields(p) -> None:
    """The noise-schedule fields of an MDLMConfig (or a config extending it), each refused by name."""
    if p.schedule not in SCHEDULES:
        raise ValueError(f"unknown process.schedule '{p.schedule}'; valid: {', '.join(SCHEDULES)}")
    for name in ("eps", "sampling_eps"):
        if not 0.0 <= getattr(p, name) < 1.0:
            raise ValueError(f"process.{name}={getattr(p, name)} must be in [0, 1)")


@dataclass
class MDLMConfig(ProcessConfig):
    name: str = "mdlm"
    schedule: str = "loglinear"  # "loglinear" | "cosine" | "linear" (dlm.process.schedules)
    eps: float = 1e-3  # alpha_1 = eps: the schedule's end point
    sampling_eps: float = 1e-3  # t is drawn from [sampling_eps, 1]
    antithetic: bool = True  # low-discrepancy time sampling over the batch


class SUBSProcess(Process):
    """What MDLM and BD3-LM share for samplers (dlm.process.base): the SUBS parameterisation and a noise schedule
    (`self.schedule`)."""

    schedule: NoiseSchedule

    def denoise(self, logits: torch.Tensor) -> torch.Tensor:
        """SUBS zero-masking: x_theta never predicts [MASK] (carry-over is the samplers' rule: clean tokens stay)."""
        return subs_logits(logits, self.mask_id)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.alpha(t)

    def time_of_mask_rate(self, rate):
        return time_of_mask_rate(self.schedule, rate)

    def log_score(self, logits: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """RADD (Ou et al. 2024): the absorbing score of x_theta, s_v = e^{-σ̄}/(1 - e^{-σ̄}) x_theta(v) =
        alpha_t/(1 - alpha_t) x_theta(v) at a masked position; log s = 0 at the current token (B, L, V) float32.
        t (B,): each row's time. The score samplers then sample an MDLM (dlm/sampler/score.py)."""
        a = self.alpha(torch.as_tensor(t, dtype=torch.float64, device=logits.device))
        log_r = (torch.log(a) - torch.log1p(-a)).float()
        while log_r.dim() < logits.dim():
            log_r = log_r.unsqueeze(-1)
        out = subs_logits(logits, self.mask_id).log_softmax(-1) + log_r
        return out.scatter(-1, z.unsqueeze(-1), 0.0)

    def noise_rate(self, t: torch.Tensor) -> torch.Tensor:
        """σ'(t) = -alpha'_t / alpha_t (float64)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return -self.schedule.dalpha(t) / self.schedule.alpha(t)


@register_process
class MaskedDiffusion(SUBSProcess):
    """The MDLM process: noising, the training loss and the NELBO used for evaluation."""

    name = "mdlm"
    corruption = "absorbing"
    config_class = MDLMConfig

    def __init__(self, schedule: NoiseSchedule, mask_id: int, sampling_eps: float = 1e-3,
                 antithetic: bool = True, time_conditioning: bool = False):
        super().__init__(mask_id, time_conditioning)
        self.schedule = schedule
        self.sampling_eps = sampling_eps
        self.antithetic = antithetic

    @classmethod
    def from_config(cls, cfg, description):
        return cls(make_schedule(cfg.schedule, cfg.eps), description.mask_id, cfg.sampling_eps, cfg.antithetic,
                   description.time_conditioning)

    @classmethod
    def check_config(cls, cfg) -> None:
        check_schedule_fields(cfg.process)


    def add_noise(self, x: torch.Tensor, t: torch.Tensor, loss_mask: torch.Tensor, generator=None) -> torch.Tensor:
        """z_t (B, L): each position in loss_mask becomes [MASK] with probability 1 - alpha_t (t is (B,))."""
        p_mask = 1.0 - self.schedule.alpha(t)[:, None]  # (B, 1)
        u = uniform(x.shape, generator, x.device)  # generator: one, or a list of one per row
        return torch.where((u < p_mask) & loss_mask, self.mask_id, x)

    def loss(self, network, batch: dict, generator: torch.Generator | None = None, t: torch.Tensor | None = None,
             embed_fn=None) -> LossOutput:
        """The NELBO per scored token of one batch, for t (B,) drawn antithetically unless given.

        embed_fn(z, t) -> (B, L, C) or None, called after z_t is drawn, gives the network's input embeddings; by
        default the process's feedback hook (`second_pass_inputs`: None, one plain pass, for MDLM itself; a
        soft-masking wrapper passes its own). Random draws: t, then z_t, then whatever the hook draws.
        Given positions (batch["given"]) are neither noised nor scored (the process contract).
        """
        batch = self.honour_given(batch)
        x, loss_mask = batch["input_ids"], batch["loss_mask"]
        if t is None:
            t = antithetic_times(x.shape[0], self.sampling_eps, generator, x.device, self.antithetic)
        z = self.add_noise(x, t, loss_mask, generator)
        if embed_fn is None:
            inputs_embeds = second_pass_inputs(self, network, batch, z, t, generator)
        else:
            inputs_embeds = embed_fn(z, t)
        return self.loss_at(network, batch, z, t, inputs_embeds)

    def loss_at(self, network, batch: dict, z: torch.Tensor, t: torch.Tensor, inputs_embeds=None) -> LossOutput:
        """The NELBO of a batch at a given z_t (B, L) and t (B,).

        Only masked positions are scored (carry-over makes the others contribute exactly 0), so the output layer
        and the cross-entropy run on those N positions only: (N, C) -> (N, V), about half of the (B, L, V) work
        on average over t. `nelbo_terms` is the dense formula, used to test this one. With trainer.chunked_ce the
        (N, V) logits are computed a chunk of positions at a time (dlm/network/chunked_ce.py).
        """
        x, loss_mask = batch["input_ids"], batch["loss_mask"]
        masked = (z == self.mask_id) & loss_mask  # (B, L)
        chunk = chunk_size(network)  # trainer.chunked_ce: the network returns hidden states, the loss runs the head
        out = network(z if inputs_embeds is None else None, inputs_embeds=inputs_embeds, t=self.network_time(t),
                      attn_mask=key_padding_mask(batch), logits_at=masked,
                      **({"return_hidden": True} if chunk else {}))  # (N, V) logits, or (N, C) hidden states
        ce = (chunked_cross_entropy(out, network.head, x[masked], chunk, self.mask_id) if chunk else
              F.cross_entropy(subs_logits(out, self.mask_id), x[masked], reduction="none"))  # (N,)
        weights = self.schedule.loss_weight(t)[:, None].expand_as(z)[masked]  # (N,)
        terms = ce * weights  # (N,)
        total = terms.sum()
        num_tokens = loss_mask.sum()
        row_of = masked.nonzero()[:, 0]  # (N,): the row of each scored term
        per_row = torch.zeros(x.shape[0], device=x.device, dtype=terms.dtype).index_add_(0, row_of, terms.detach())
        return LossOutput(total / num_tokens.clamp(min=1), total.detach(), num_tokens.detach(), per_row,
                          loss_mask.sum(1))

    @torch.no_grad()
    def nelbo(self, network, batch: dict, num_t_samples: int, generator: torch.Generator, embed_fn=None) -> LossOutput:
        """Monte Carlo NELBO of each sequence with `num_t_samples` antithetic times per sequence (evaluation).
        generator: one, or a list of one per row (each row's times and masks then depend on its own only).
        The process's feedback (`loss_feedback`) is fed at every time: the bound of the two-pass denoiser."""
        batch = self.honour_given(batch)
        x = batch["input_ids"]
        if embed_fn is None:
            embed_fn = lambda z, t: second_pass_inputs(self, network, batch, z, t, generator, always=True)  # noqa: E731
        times = evaluation_times((x.shape[0],), num_t_samples, self.sampling_eps, generator, x.device)  # (B, n)
        nll_sum = torch.zeros((), device=x.device, dtype=torch.float64)
        per_row = torch.zeros(x.shape[0], device=x.device, dtype=torch.float64)
        for j in range(num_t_samples):
            out = self.loss(network, batch, generator, t=times[:, j], embed_fn=embed_fn)
            nll_sum += out.nll_sum.double()
            per_row += out.nll_per_row.double()
        num_tokens = batch["loss_mask"].sum()
        return LossOutput(nll_sum / num_t_samples / num_tokens, nll_sum / num_t_samples, num_tokens,
                          per_row / num_t_samples, batch["loss_mask"].sum(1))


def key_padding_mask(batch: dict) -> torch.Tensor | None:
    """(B, 1, 1, L) bool: queries may attend to non-padding keys only (None when nothing is padded)."""
    am = batch.get("attention_mask")
    return None if am is None else am[:, None, None, :]
