"""Eso-LM: masked diffusion for an alpha0 share of the tokens, then autoregression for the rest (SPEC §7).

Sahoo, Yang et al., "Esoteric Language Models" (arXiv 2506.01928; v4, ICML: "A Family of Any-Order Diffusion
LLMs"). The model is p(x) = sum_{z0} p_AR(x | z0) p_MDM(z0): a masked diffusion draws z0, a sequence whose masks
(each token masked with probability 1 - alpha0 by q0) an autoregressive pass then fills left to right. With the
scaled log-linear schedule alpha_t = alpha0 (1 - (1 - eps) t) the bound is

    NELBO(x) = E_{z0 ~ q0} [ -sum_{l masked in z0} log x_theta^l(z0 with x^{<l} filled in)[x^l] ]        (AR term)
             + E_t E_{z_t} [ w(t) sum_{l masked in z_t} -log x_theta^l(z_t)[x^l] ],                     (MDM term)

w(t) = -alpha'_t / (1 - alpha_t) = 1 / (t + (1 - alpha0) / (alpha0 (1 - eps))) (1/t at alpha0 = 1: MDLM's; 0 at
alpha0 = 0: pure AR). `weight="low_var"` trains the MDM term with w = 1 (the reference's low-variance loss); the
bound (`nelbo`) always uses the ELBO weight.

The network runs on a sorted sequence (dlm.process.esolm_mask): context first (positions the process never
corrupts: BOS, given prompt tokens; natural order), then the clean tokens (random order), then the masks (random
order for the MDM term, natural order for the AR term), then padding; tokens keep their rotary positions (gathered
by the same order, per row). Training splits the batch: the first kappa share of the rows get the MDM term (times
antithetic over those rows), the others the AR term on the 2L input [z0_sorted ; x_sorted]; the loss is each
half's per-token loss, summed.

`attention`: "causal" (v1's Eso-LM (B), v4's Eso-LM: one exact KV cache while sampling) or "clean_bidirectional"
(v1's Eso-LM (A): clean tokens see each other, masks causal).

`order_nll` is the any-order negative log-likelihood of x for one reveal order (dlm.process.any_order): one 2L pass
for the causal variant, one pass per revealed token for clean_bidirectional.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlm.network.base import select_positions
from dlm.process.base import LossOutput, ProcessConfig, register_process
from dlm.process.esolm_mask import (CAUSAL, check_attention, diffusion_mask, sequential_mask, with_valid_keys)
from dlm.process.mdlm import SUBSProcess, antithetic_times, evaluation_times, subs_logits, uniform
from dlm.process.schedules import NoiseSchedule

WEIGHTS = ("elbo", "low_var")


class ScaledLogLinear(NoiseSchedule):
    """alpha_t = alpha0 (1 - (1 - eps) t): alpha0 at t = 0 (the tokens the diffusion leaves clean are made by the
    AR pass), alpha0 * eps at t = 1. alpha0 = 1 is MDLM's log-linear schedule."""

    def __init__(self, alpha0: float, eps: float = 1e-3):
        super().__init__(eps)
        self.alpha0 = alpha0

    def alpha(self, t):
        return self.alpha0 * (1.0 - (1.0 - self.eps) * t)

    def dalpha(self, t):
        return torch.full_like(t, -self.alpha0 * (1.0 - self.eps))

    def loss_weight(self, t):
        """-alpha'_t / (1 - alpha_t) = 1 / (t + (1 - alpha0) / (alpha0 (1 - eps))): exactly 1/t at alpha0 = 1, 0 at
        alpha0 = 0."""
        if self.alpha0 == 0.0:
            return torch.zeros_like(t)
        return 1.0 / (t + (1.0 - self.alpha0) / (self.alpha0 * (1.0 - self.eps)))

    def __repr__(self) -> str:
        return f"ScaledLogLinear(alpha0={self.alpha0}, eps={self.eps})"


def default_kappa(alpha0: float) -> float:
    """The share of a training batch's rows that get the MDM term: 1 at alpha0 = 1 (nothing for the AR pass), 0 at
    alpha0 = 0 (the MDM weight is 0), else 0.5 (the reference)."""
    return 1.0 if alpha0 == 1.0 else 0.0 if alpha0 == 0.0 else 0.5


def sort_order(context: torch.Tensor, masked: torch.Tensor, valid: torch.Tensor, keys: torch.Tensor,
               mask_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma (B, L) long, num_clean (B,) long): the sorted sequence is x[sigma]. Context (valid positions that
    are never corrupted) first in natural order, then the clean positions ordered by `keys` (B, L) in [0, 1), then
    the masked ones by `mask_keys` in [0, 1) (None: natural order), then invalid ones (padding). num_clean: the
    context and clean positions (the places before the first mask)."""
    L = context.shape[1]
    pos = (torch.arange(L, device=context.device, dtype=torch.float64) / L).expand_as(keys)
    clean = valid & ~context & ~masked
    mk = pos if mask_keys is None else mask_keys.double()
    key = torch.where(context, pos, torch.where(clean, 1.0 + keys.double(),
                                                torch.where(masked, 2.0 + mk, 3.0 + pos)))
    return key.argsort(dim=1, stable=True), (valid & ~masked).sum(1)


def row_generators(generator, rows: slice):
    """The generators of some rows: a per-row list is sliced, one shared generator stays itself."""
    return generator[rows] if isinstance(generator, (list, tuple)) else generator


@dataclass
class EsoLMConfig(ProcessConfig):
    name: str = "esolm"
    alpha0: float = 0.5  # expected share of tokens made by the diffusion phase, in training (1: MDLM-like; 0: AR)
    alpha0_eval: float = -1.0  # the alpha0 of the bound (nelbo) and of sampling (-1: alpha0)
    kappa: float = -1.0  # share of a batch's rows trained on the MDM term (-1: 1 at alpha0=1, 0 at alpha0=0, else 0.5)
    attention: str = CAUSAL  # "causal" (Eso-LM (B), cacheable) | "clean_bidirectional" (Eso-LM (A))
    weight: str = "elbo"  # MDM term's training weight: "elbo" (-alpha'/(1-alpha)) | "low_var" (1)
    eps: float = 1e-3  # alpha_1 = alpha0 * eps
    sampling_eps: float = 1e-3  # t is drawn from [sampling_eps, 1]
    antithetic: bool = True  # low-discrepancy times over the diffusion rows


def check_esolm_fields(p) -> None:
    """Each field of an EsoLMConfig, refused by name with its valid values."""
    check_attention(p.attention)
    if not 0.0 <= p.alpha0 <= 1.0:
        raise ValueError(f"process.alpha0={p.alpha0} must be in [0, 1] (1: MDLM-like diffusion, 0: autoregressive)")
    if p.alpha0_eval != -1.0 and not 0.0 <= p.alpha0_eval <= 1.0:
        raise ValueError(f"process.alpha0_eval={p.alpha0_eval} must be in [0, 1], or -1 for process.alpha0")
    if p.kappa != -1.0 and not 0.0 <= p.kappa <= 1.0:
        raise ValueError(f"process.kappa={p.kappa} must be in [0, 1] (the share of rows trained on the diffusion "
                         "term), or -1 for the default")
    kappa = default_kappa(p.alpha0) if p.kappa == -1.0 else p.kappa
    if kappa == 0.0 and p.alpha0 > 0.0:
        raise ValueError(f"process.kappa=0 trains no row on the diffusion term, but process.alpha0={p.alpha0} > 0 "
                         "needs it; raise kappa (or set alpha0=0 for a purely autoregressive model)")
    if kappa == 1.0 and p.alpha0 < 1.0:
        raise ValueError(f"process.kappa=1 trains no row on the sequential term, but process.alpha0={p.alpha0} < 1 "
                         "needs it; lower kappa (or set alpha0=1)")
    if p.weight not in WEIGHTS:
        raise ValueError(f"unknown process.weight '{p.weight}'; valid: {', '.join(WEIGHTS)}")
    for name in ("eps", "sampling_eps"):
        if not 0.0 <= getattr(p, name) < 1.0:
            raise ValueError(f"process.{name}={getattr(p, name)} must be in [0, 1)")


@register_process
class EsoLM(SUBSProcess):
    """The Eso-LM process: the kappa-split training loss, the NELBO (MDM + AR terms) and the any-order NLL of a
    reveal order. `self.schedule` is the evaluation / sampling schedule (alpha0_eval), `train_schedule` training's."""

    name = "esolm"
    corruption = "absorbing"
    likelihood = "bound"
    default_sampler = "esolm"  # its own sampler: the exact KV cache of the causal rule (dlm/sampler/esolm.py)
    config_class = EsoLMConfig

    def __init__(self, mask_id: int, alpha0: float = 0.5, alpha0_eval: float | None = None,
                 kappa: float | None = None, attention: str = CAUSAL, weight: str = "elbo", eps: float = 1e-3,
                 sampling_eps: float = 1e-3, antithetic: bool = True, time_conditioning: bool = False):
        cfg = EsoLMConfig(alpha0=alpha0, alpha0_eval=-1.0 if alpha0_eval is None else alpha0_eval,
                          kappa=-1.0 if kappa is None else kappa, attention=attention, weight=weight, eps=eps,
                          sampling_eps=sampling_eps, antithetic=antithetic)
        check_esolm_fields(cfg)
        super().__init__(mask_id, time_conditioning)
        self.alpha0 = alpha0
        self.alpha0_eval = alpha0 if alpha0_eval is None or alpha0_eval == -1.0 else alpha0_eval
        self.kappa = default_kappa(alpha0) if kappa is None or kappa == -1.0 else kappa
        self.attention, self.weight = attention, weight
        self.sampling_eps, self.antithetic = sampling_eps, antithetic
        self.train_schedule = ScaledLogLinear(alpha0, eps)
        self.schedule = ScaledLogLinear(self.alpha0_eval, eps)

    @classmethod
    def from_config(cls, cfg, description):
        return cls(description.mask_id, cfg.alpha0, cfg.alpha0_eval, cfg.kappa, cfg.attention, cfg.weight, cfg.eps,
                   cfg.sampling_eps, cfg.antithetic, description.time_conditioning)

    @classmethod
    def check_config(cls, cfg) -> None:
        check_esolm_fields(cfg.process)
        if cfg.softmask.enabled:
            raise ValueError("process=esolm has no soft-masking: its network runs on a sorted sequence that the "
                             "soft-masking feedback does not know; set softmask.enabled=false")

    def extra_repr(self) -> str:
        return (f"alpha0={self.alpha0}, alpha0_eval={self.alpha0_eval}, kappa={self.kappa}, "
                f"attention={self.attention}, weight={self.weight}")

    # ------------------------------------------------------------------------------------------ network passes
    def _net_time(self, t: torch.Tensor | None, rows: int, device) -> torch.Tensor | None:
        if not self.time_conditioning:
            return None
        return torch.zeros(rows, device=device) if t is None else t

    def diffusion_logits(self, network, z: torch.Tensor, sigma: torch.Tensor, num_clean: torch.Tensor,
                         valid: torch.Tensor, positions: torch.Tensor, t: torch.Tensor | None = None,
                         logits_at: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                         extra_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits on the sorted sequence z[sigma] (B, L) with positions[sigma] and the variant's rule (and
        `extra_mask`, in sorted order, if any): (B, L, V) in sorted order, or (N, V) at `logits_at` (B, L) bool, a
        mask over SORTED places."""
        zs, ps, vs = z.gather(1, sigma), positions.gather(1, sigma), valid.gather(1, sigma)
        rule = diffusion_mask(num_clean, z.shape[1], self.attention)
        mask = with_valid_keys(rule if extra_mask is None else rule & extra_mask, vs)
        embeds = None
        if inputs_embeds is not None:
            embeds = inputs_embeds.gather(1, sigma[..., None].expand(-1, -1, inputs_embeds.shape[-1]))
        return network(None if embeds is not None else zs, inputs_embeds=embeds,
                       t=self._net_time(t, z.shape[0], z.device), attn_mask=mask, positions=ps, logits_at=logits_at)

    def sequential_logits(self, network, z0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                          num_clean: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
                          logits_at: torch.Tensor) -> torch.Tensor:
        """(N, V) raw logits at `logits_at` (B, L) bool over the SORTED places of z0, from one pass on the 2L input
        [z0[sigma] ; x[sigma]] (both halves with positions[sigma]) under BD3-LM's block-size-1 rule."""
        L = x.shape[1]
        zs, xs, ps, vs = z0.gather(1, sigma), x.gather(1, sigma), positions.gather(1, sigma), valid.gather(1, sigma)
        mask = with_valid_keys(sequential_mask(num_clean, L, self.attention), torch.cat((vs, vs), 1))
        at = torch.cat((logits_at, torch.zeros_like(logits_at)), 1)
        return network(torch.cat((zs, xs), 1), t=self._net_time(None, x.shape[0], x.device), attn_mask=mask,
                       positions=torch.cat((ps, ps), 1), logits_at=at)

    def forward_logits(self, network, z, t, batch=None, inputs_embeds=None, *, positions=None, key_valid=None,
                       attn_mask=None, kv_cache=None, cache_update=False, logits_at=None) -> torch.Tensor:
        """Raw logits (B, L, V) in the canvas's own layout (or at `logits_at` of it). Without a KV cache the call is
        a whole canvas: it is sorted (valid clean tokens first, then masks, each in the canvas's order; left padding
        and other invalid keys last), run with the variant's rule AND the caller's `attn_mask` (gathered by the same
        order) and the positions gathered by it, and the logits are put back at their places. A canvas that is
        already sorted (an Eso-LM sampler's own layout) is left in its order. With a KV cache the call is the
        caller's own layout (an Eso-LM sampler's sorted chunks, with their positions and mask): passed to the
        network as given."""
        if kv_cache is not None:
            return super().forward_logits(network, z, t, batch, inputs_embeds, positions=positions,
                                          key_valid=key_valid, attn_mask=attn_mask, kv_cache=kv_cache,
                                          cache_update=cache_update, logits_at=logits_at)
        B, L = z.shape
        valid = torch.ones_like(z, dtype=torch.bool) if key_valid is None else key_valid.bool()
        am = (batch or {}).get("attention_mask")
        if am is not None:
            valid = valid & am.bool()
        if positions is None:
            positions = torch.arange(L, device=z.device)
        positions = positions.expand(B, L) if positions.dim() == 1 else positions
        masked = (z == self.mask_id) & valid
        sigma, num_clean = sort_order(valid & ~masked, masked, valid, torch.zeros(B, L, device=z.device))
        extra = None
        if attn_mask is not None:  # (..., L, L) in the canvas's layout -> (B, h, L, L) in the sorted one
            m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
            m = m.expand(B, m.shape[1], L, L)
            m = m.gather(2, sigma[:, None, :, None].expand(-1, m.shape[1], -1, L))
            extra = m.gather(3, sigma[:, None, None, :].expand(-1, m.shape[1], L, -1))
        sorted_logits = self.diffusion_logits(network, z, sigma, num_clean, valid, positions, t,
                                              inputs_embeds=inputs_embeds, extra_mask=extra)  # (B, L, V)
        logits = torch.empty_like(sorted_logits).scatter_(1, sigma[..., None].expand_as(sorted_logits), sorted_logits)
        return select_positions(logits, logits_at)

    # ------------------------------------------------------------------------------------------ the two terms
    @staticmethod
    def _layout(batch: dict):
        """(x, loss_mask, context, valid, positions) of a batch whose loss_mask already honours `given`."""
        x, lm = batch["input_ids"], batch["loss_mask"]
        am = batch.get("attention_mask")
        valid = torch.ones_like(lm) if am is None else am.bool()
        positions = torch.arange(x.shape[1], device=x.device).expand_as(x)
        return x, lm, valid & ~lm, valid, positions

    def diffusion_terms(self, network, batch: dict, t: torch.Tensor, generator, schedule: NoiseSchedule,
                        weight: str = "elbo") -> torch.Tensor:
        """(B,) MDM term of each row at its time t (B,): w(t) * sum over z_t's masks of -log x_theta[x] (weight 1
        for "low_var"). Draws z_t, then the sort keys."""
        x, lm, context, valid, positions = self._layout(batch)
        p_mask = 1.0 - schedule.alpha(t)[:, None]  # (B, 1)
        masked = (uniform(x.shape, generator, x.device) < p_mask) & lm
        z = torch.where(masked, self.mask_id, x)
        keys = uniform(x.shape, generator, x.device)
        sigma, num_clean = sort_order(context, masked, valid, keys, keys)
        at = masked.gather(1, sigma)  # (B, L) sorted places to score
        logits = self.diffusion_logits(network, z, sigma, num_clean, valid, positions, t, logits_at=at)  # (N, V)
        ce = F.cross_entropy(subs_logits(logits, self.mask_id), x.gather(1, sigma)[at], reduction="none")  # (N,)
        if weight == "elbo":
            w = torch.where(masked.any(1), schedule.loss_weight(t), 0.0)  # (B,): no 0 * inf at t = 0
            ce = ce * w[:, None].expand_as(at)[at]
        return torch.zeros(x.shape[0], device=x.device, dtype=ce.dtype).index_add_(0, at.nonzero()[:, 0], ce)

    def sequential_terms(self, network, batch: dict, alpha0: float, generator) -> torch.Tensor:
        """(B,) AR term of each row: z0 masks each scored token with probability 1 - alpha0; the sum over z0's masks
        of -log p(x^l | clean tokens of z0, x at the masks before l). Draws z0, then the sort keys."""
        x, lm, context, valid, positions = self._layout(batch)
        masked = (uniform(x.shape, generator, x.device) < 1.0 - alpha0) & lm
        keys = uniform(x.shape, generator, x.device)
        sigma, num_clean = sort_order(context, masked, valid, keys)  # masks in natural order
        return self._masked_nll(network, x, masked, sigma, num_clean, valid, positions)

    def _masked_nll(self, network, x, masked, sigma, num_clean, valid, positions) -> torch.Tensor:
        """(B,) sum over the masked positions of -log p(x^l | what precedes l in sigma), from one 2L pass."""
        z0 = torch.where(masked, self.mask_id, x)
        at = masked.gather(1, sigma)
        logits = self.sequential_logits(network, z0, x, sigma, num_clean, valid, positions, at)  # (N, V)
        ce = F.cross_entropy(subs_logits(logits, self.mask_id), x.gather(1, sigma)[at], reduction="none")
        return torch.zeros(x.shape[0], device=x.device, dtype=ce.dtype).index_add_(0, at.nonzero()[:, 0], ce)

    # ------------------------------------------------------------------------------------------ objective
    def diffusion_rows(self, batch_size: int, generator) -> int:
        """How many of the first rows get the MDM term: kappa * B, rounded stochastically when it is not whole (one
        uniform draw, only then), so that its expectation is kappa * B."""
        share = self.kappa * batch_size
        whole = int(share)
        if share == whole or isinstance(generator, (list, tuple)):
            return int(round(share))
        return whole + int(float(torch.rand(1, generator=generator)) < share - whole)

    def loss(self, network, batch: dict, generator: torch.Generator | None = None) -> LossOutput:
        """The kappa split: the first rows' MDM term (antithetic times over them) and the other rows' AR term, each
        per scored token of its rows, summed. Per row, each term is divided by its share of the rows (kappa or
        1 - kappa), so that nll_sum estimates the batch's NELBO."""
        batch = self.honour_given(batch)
        x, lm = batch["input_ids"], batch["loss_mask"]
        B = x.shape[0]
        n = self.diffusion_rows(B, generator)
        per_row = torch.zeros(B, device=x.device)
        loss = torch.zeros((), device=x.device)
        halves = ((True, slice(0, n), self.kappa), (False, slice(n, B), 1.0 - self.kappa))
        for diffusion, rows, share in halves:
            if rows.stop <= rows.start:
                continue
            part = {k: v[rows] for k, v in batch.items()}
            if diffusion:
                if self.alpha0 == 0.0:
                    continue  # w = 0: nothing to learn
                t = antithetic_times(rows.stop, self.sampling_eps, generator, x.device, self.antithetic)
                terms = self.diffusion_terms(network, part, t, row_generators(generator, rows), self.train_schedule,
                                             self.weight)
            else:
                if self.alpha0 == 1.0:
                    continue  # z0 = x: no mask to fill
                terms = self.sequential_terms(network, part, self.alpha0, row_generators(generator, rows))
            loss = loss + terms.sum() / lm[rows].sum().clamp(min=1)
            per_row[rows] = terms.detach() / share
        num_tokens = lm.sum()
        return LossOutput(loss, per_row.sum(), num_tokens.detach(), per_row, lm.sum(1))

    @torch.no_grad()
    def nelbo(self, network, batch: dict, num_t_samples: int, generator) -> LossOutput:
        """Monte Carlo NELBO at alpha0_eval: each row gets both terms at each of `num_t_samples` samples (an
        antithetic time and z_t for the MDM term, a z0 for the AR term). generator: one, or one per row."""
        batch = self.honour_given(batch)
        x, lm = batch["input_ids"], batch["loss_mask"]
        a0 = self.alpha0_eval
        times = evaluation_times((x.shape[0],), num_t_samples, self.sampling_eps, generator, x.device)  # (B, n)
        per_row = torch.zeros(x.shape[0], device=x.device, dtype=torch.float64)
        for j in range(num_t_samples):
            if a0 > 0.0:
                per_row += self.diffusion_terms(network, batch, times[:, j], generator, self.schedule).double()
            if a0 < 1.0:
                per_row += self.sequential_terms(network, batch, a0, generator).double()
        per_row /= num_t_samples
        num_tokens = lm.sum()
        total = per_row.sum()
        return LossOutput(total / num_tokens.clamp(min=1), total, num_tokens, per_row, lm.sum(1))

    # ------------------------------------------------------------------------------------------ any order
    def random_ranks(self, loss_mask: torch.Tensor, generator) -> torch.Tensor:
        """(B, L) ranks of an order drawn as the sampler with one token per step draws it (-1 off loss_mask): each
        scored position joins the diffusion set with probability alpha0_eval (a Binomial count), the set first in a
        uniformly random order, then the others left to right. alpha0_eval = 1: a uniform order; 0: left to right."""
        from dlm.process.any_order import ranks_of_keys

        drafted = (uniform(loss_mask.shape, generator, loss_mask.device) < self.alpha0_eval) & loss_mask
        keys = uniform(loss_mask.shape, generator, loss_mask.device)
        L = loss_mask.shape[1]
        natural = torch.arange(L, device=loss_mask.device, dtype=torch.float64) / L
        # Drafted positions first (keys in [0, 1)), then the others by position (in [1, 2)): one sort does both.
        return ranks_of_keys(torch.where(drafted, keys.double(), 1.0 + natural) / 2.0, loss_mask)

    @torch.no_grad()
    def order_nll(self, network, batch: dict, ranks: torch.Tensor) -> torch.Tensor:
        """(B,) -log p(x | order): the scored tokens revealed one at a time in the order of `ranks` (B, L) (rank of
        each scored position; the others ignored), each predicted from the context and the tokens revealed before
        it (the first mask of the diffusion denoiser: it sees the clean tokens and itself). Causal attention: one 2L
        pass, exactly the per-step denoiser (tested). clean_bidirectional: one pass per revealed token."""
        batch = self.honour_given(batch)
        x, lm, context, valid, positions = self._layout(batch)
        keys = ranks.double().clamp(min=0) / (ranks.max().clamp(min=0).double() + 1)  # (B, L) in [0, 1)
        if self.attention == CAUSAL:
            sigma, num_clean = sort_order(context, lm, valid, keys, keys)
            return self._masked_nll(network, x, lm, sigma, num_clean, valid, positions)
        return self.stepwise_order_nll(network, batch, ranks)

    @torch.no_grad()
    def stepwise_order_nll(self, network, batch: dict, ranks: torch.Tensor, rows_per_call: int = 256) -> torch.Tensor:
        """(B,) the same any-order NLL from one diffusion pass per revealed token: at step k the tokens of rank < k
        are clean, the others masks (sorted by rank, so the target is the first mask). Several steps go through one
        network call (about `rows_per_call` rows: the batch repeated once per step)."""
        batch = self.honour_given(batch)
        x, lm, context, valid, positions = self._layout(batch)
        B = x.shape[0]
        keys = ranks.double().clamp(min=0) / (ranks.max().clamp(min=0).double() + 1)
        total = torch.zeros(B, device=x.device, dtype=torch.float64)
        counts = lm.sum(1)
        steps = int(counts.max()) if lm.any() else 0
        per_call = max(1, rows_per_call // B)
        for first in range(0, steps, per_call):
            k = torch.arange(first, min(steps, first + per_call), device=x.device).repeat_interleave(B)[:, None]
            S = k.shape[0] // B
            rep = lambda v: v.repeat(S, *([1] * (v.dim() - 1)))  # noqa: E731  (S*B, ...): step-major
            xs, lms, rs, ks = rep(x), rep(lm), rep(ranks), rep(keys)
            masked, target = lms & (rs >= k), lms & (rs == k)
            z = torch.where(masked, self.mask_id, xs)
            sigma, num_clean = sort_order(rep(context), masked, rep(valid), ks, ks)
            t = None
            if self.time_conditioning:
                t = self.schedule_time(masked.sum(1) / rep(counts).clamp(min=1))
            at = target.gather(1, sigma)
            logits = self.diffusion_logits(network, z, sigma, num_clean, rep(valid), rep(positions), t, logits_at=at)
            ce = F.cross_entropy(subs_logits(logits, self.mask_id), xs.gather(1, sigma)[at], reduction="none")
            total.index_add_(0, at.nonzero()[:, 0] % B, ce.double())
        return total

    def schedule_time(self, mask_rate: torch.Tensor) -> torch.Tensor:
        """The time (float32) at which the evaluation schedule's mask rate is `mask_rate`."""
        return self.time_of_mask_rate(mask_rate).float().to(mask_rate.device)

