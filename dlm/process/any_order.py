"""Any-order likelihoods: the NLL of x for one reveal order, and the K-order importance-weighted estimate.

An absorbing-diffusion denoiser defines, for every order pi of the scored positions, an autoregressive model
p(x | pi) = prod_k p(x^{pi_k} | x^{pi_<k}): reveal the tokens one at a time in that order, each predicted from the
context and the tokens revealed before it. A model that draws pi from a distribution q and then decodes in that
order (the samplers with one token per step) has the likelihood

    p(x) = E_{pi ~ q} [ p(x | pi) ],   -log p(x) <= L_AO = E_{pi ~ q} [ -log p(x | pi) ]   (Jensen),

and the importance-weighted estimate with K orders drawn from q (proposal = prior, so each weight is p(x | pi_k))

    L_AO^K = -log (1/K sum_k p(x | pi_k)),   E[L_AO^1] = L_AO >= E[L_AO^K] >= E[L_AO^{K+1}] -> -log p(x),

(Burda et al. 2016: non-increasing in K in expectation, consistent). Enumerating every order with its probability
gives -log p(x) exactly (tests/process/test_any_order.py does, on a tiny vocabulary and length).

Which denoiser and which q:
- MDLM (process=mdlm): p(x^{pi_k} | x^{pi_<k}) is x_theta at pi_k on the sequence whose tokens pi_>=k are [MASK]
  (bidirectional: one network pass per revealed token); q uniform over orders. Its NELBO is E_pi[-log p(x | pi)]
  for a time-independent denoiser (the log-linear bound's any-order form), so L_AO^K sits below it in expectation.
- Eso-LM (process=esolm): its own `order_nll` (one 2L pass with causal attention) and `random_ranks` (q of its
  sampler with one token per step: Binomial(n, alpha0_eval) positions first in random order, then the rest left to
  right; uniform at alpha0 = 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dlm.process.mdlm import MaskedDiffusion, subs_logits, uniform


def ranks_of_keys(keys: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) long: the rank (0, 1, ...) of each scored position when sorted by keys (B, L); -1 elsewhere."""
    order = torch.where(loss_mask, keys.double(), 2.0 + keys.double()).argsort(dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(keys.shape[1], device=keys.device).expand_as(order))
    return torch.where(loss_mask, ranks, -1)


def uniform_ranks(loss_mask: torch.Tensor, generator) -> torch.Tensor:
    """(B, L) ranks of a uniformly random order of each row's scored positions (-1 elsewhere); generator: one, or
    one per row."""
    return ranks_of_keys(uniform(loss_mask.shape, generator, loss_mask.device), loss_mask)


def supports_any_order(process) -> bool:
    return hasattr(process, "order_nll") or (isinstance(process, MaskedDiffusion)
                                             and process.loss_feedback(None, "cpu", always=True) is None)


def check_any_order(process) -> None:
    if not supports_any_order(process):
        raise ValueError(f"an any-order likelihood needs a masked-diffusion denoiser without feedback (process=mdlm "
                         f"or process=esolm); process '{process.name}' has none"
                         + (" (its tokens are predicted left to right: its NELBO is already exact)"
                            if process.autoregressive else ""))


def random_ranks(process, loss_mask: torch.Tensor, generator) -> torch.Tensor:
    """An order drawn from the process's order distribution q (its `random_ranks`; uniform otherwise)."""
    own = getattr(process, "random_ranks", None)
    return own(loss_mask, generator) if own is not None else uniform_ranks(loss_mask, generator)


@torch.no_grad()
def order_nll(process, network, batch: dict, ranks: torch.Tensor) -> torch.Tensor:
    """(B,) -log p(x | order) in nats, summed over each row's scored positions (ranks (B, L): -1 off them)."""
    check_any_order(process)
    if hasattr(process, "order_nll"):
        return process.order_nll(network, batch, ranks)
    return mdlm_order_nll(process, network, batch, ranks)


@torch.no_grad()
def mdlm_order_nll(process, network, batch: dict, ranks: torch.Tensor, rows_per_call: int = 256) -> torch.Tensor:
    """MDLM's any-order NLL: at step k the positions of rank >= k are [MASK] and x_theta is read at rank k (one
    bidirectional pass per step; the time, for a time-conditioned network, is that of the masked share). Several
    steps go through one network call (about `rows_per_call` rows: the batch repeated once per step)."""
    batch = process.honour_given(batch)
    x, lm = batch["input_ids"], batch["loss_mask"]
    B = x.shape[0]
    am = batch.get("attention_mask")
    total = torch.zeros(B, device=x.device, dtype=torch.float64)
    counts = lm.sum(1)
    steps = int(counts.max()) if lm.any() else 0
    per_call = max(1, rows_per_call // B)
    for first in range(0, steps, per_call):
        k = torch.arange(first, min(steps, first + per_call), device=x.device).repeat_interleave(B)[:, None]  # (S*B, 1)
        S = k.shape[0] // B
        xs, lms, rs, cs = x.repeat(S, 1), lm.repeat(S, 1), ranks.repeat(S, 1), counts.repeat(S)
        target = lms & (rs == k)  # (S*B, L): at most one position per row
        z = torch.where(lms & (rs >= k), process.mask_id, xs)
        t = process.time_of_mask_rate((cs - k[:, 0]).clamp(min=0) / cs.clamp(min=1)).float().to(x.device)
        call_batch = None if am is None else {"attention_mask": am.repeat(S, 1)}
        logits = process.forward_logits(network, z, t, call_batch, logits_at=target)  # (N, V)
        ce = F.cross_entropy(subs_logits(logits, process.mask_id), xs[target], reduction="none")
        total.index_add_(0, target.nonzero()[:, 0] % B, ce.double())
    return total


@torch.no_grad()
def importance_weighted_nll(process, network, batch: dict, num_orders: int, generator
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """((B,) L_AO^K, (B,) the mean of the K single-order NLLs (an estimate of L_AO)), in nats per row, from K
    orders drawn from the process's q. generator: one, or one per row (a row's estimate then depends on its own)."""
    if num_orders < 1:
        raise ValueError(f"num_orders={num_orders} must be a positive integer")
    check_any_order(process)
    batch = process.honour_given(batch)
    nlls = torch.stack([order_nll(process, network, batch, random_ranks(process, batch["loss_mask"], generator))
                        for _ in range(num_orders)], 1).double()  # (B, K)
    iw = -(torch.logsumexp(-nlls, dim=1) - math.log(num_orders))
    return iw, nlls.mean(1)
