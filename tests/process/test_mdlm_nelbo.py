"""The MDLM NELBO against first principles, on a toy problem small enough to enumerate.

Toy problem: 3 real tokens (ids 0-2), BOS (id 3) at position 0, [MASK] (id 4), L = 3 scored positions.
A "perfect denoiser" predicts at each masked position the exact conditional p(x_i | clean positions of z) of a
known data distribution p. Then the continuous-time NELBO of x equals -log p(x) exactly, for any schedule with
alpha_0 = 1 and alpha_1 = 0: the time integral of w(t) * P_t(k masks) is 1 / (L * C(L-1, k-1)), which makes the
NELBO the average over uniformly random unmasking orders of the chain rule sum_i -log p(x_i | revealed ones)
(any-order autoregression), and each order's sum is -log p(x).
"""

import itertools
import math

import numpy as np
import pytest
import torch

from dlm.network.base import select_positions

from dlm.process import MaskedDiffusion, nelbo_terms
from dlm.process.mdlm import antithetic_times
from dlm.process.schedules import CosineSchedule, LinearSchedule, LogLinearSchedule

N_REAL, BOS, MASK, V, L = 3, 3, 4, 5, 3


def data_distribution(seed: int = 0) -> torch.Tensor:
    """p (27,) float64 over the sequences of itertools.product(range(3), repeat=3), far from uniform."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(N_REAL**L, generator=g, dtype=torch.float64) ** 3 + 0.01
    return w / w.sum()


SEQS = torch.tensor(list(itertools.product(range(N_REAL), repeat=L)))  # (27, L)


class PerfectDenoiser(torch.nn.Module):
    """A network stub: at a masked position i, logits[v] = log p(x_i = v | the clean positions of z).

    It follows the network contract (dlm/network/base.py): forward(input_ids, ..., logits_at) -> logits.
    The [MASK] logit is set high (+3) on purpose: the SUBS zero-masking must remove it. BOS gets -inf.
    """

    def __init__(self, p: torch.Tensor):
        super().__init__()
        # z over {0, 1, 2, MASK}^L, coded in base 4 with MASK -> 3.
        table = torch.zeros(4**L, L, V, dtype=torch.float64)
        for code, z in enumerate(itertools.product(range(4), repeat=L)):
            consistent = torch.ones(len(SEQS), dtype=torch.bool)
            for i, zi in enumerate(z):
                if zi < 3:
                    consistent &= SEQS[:, i] == zi
            mass = p * consistent
            for i in range(L):
                for v in range(N_REAL):
                    table[code, i, v] = torch.log(mass[SEQS[:, i] == v].sum() / mass.sum())
        table[..., BOS] = float("-inf")
        table[..., MASK] = 3.0
        self.table = table

    def forward(self, input_ids=None, inputs_embeds=None, t=None, attn_mask=None, logits_at=None, **kw):
        z = input_ids[:, 1:].clamp(max=3)  # (B, L); MASK (4) -> digit 3
        code = (z * 4 ** torch.arange(L - 1, -1, -1)).sum(-1)  # (B,)
        bos_row = torch.zeros(z.shape[0], 1, V, dtype=torch.float64)
        return select_positions(torch.cat((bos_row, self.table[code]), dim=1), logits_at)  # (B, L + 1, V) or (N, V)


def with_bos(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((torch.full((x.shape[0], 1), BOS), x), dim=1)


def make_batch(x: torch.Tensor) -> dict:
    ids = with_bos(x)
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[:, 0] = False
    return {"input_ids": ids, "loss_mask": loss_mask}


def gauss_legendre(n: int, lo: float, hi: float):
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return (torch.tensor(lo + (hi - lo) * (nodes + 1) / 2), torch.tensor(weights * (hi - lo) / 2))


def expected_nelbo(process: MaskedDiffusion, network, x: torch.Tensor, t: torch.Tensor, tw: torch.Tensor) -> torch.Tensor:
    """sum_t tw[t] * sum over the 2^L mask patterns of P_t(pattern) * sum_l nelbo_terms, per sequence: (N,) float64.

    Exact enumeration of the forward process; only the time integral is numerical (nodes t, weights tw).
    """
    patterns = torch.tensor(list(itertools.product([False, True], repeat=L)))  # (P, L)
    N, P, T = x.shape[0], patterns.shape[0], t.shape[0]
    xs = x[:, None, None, :].expand(N, P, T, L)
    pat = patterns[None, :, None, :].expand(N, P, T, L)
    tt = t[None, None, :].expand(N, P, T)
    batch = make_batch(xs.reshape(-1, L))
    clean = batch["input_ids"]
    z = clean.clone()
    z[:, 1:] = torch.where(pat.reshape(-1, L), MASK, xs.reshape(-1, L))
    t_flat = tt.reshape(-1)
    logits = process.forward_logits(network, z, t_flat, batch)
    terms = nelbo_terms(logits, clean, z, t_flat, process.schedule, MASK, batch["loss_mask"]).sum(-1)  # (N*P*T,)
    alpha = process.schedule.alpha(t_flat)[:, None]  # (N*P*T, 1)
    prob = torch.where(pat.reshape(-1, L), 1.0 - alpha, alpha).prod(-1)  # P_t(pattern)
    return (prob * terms.double()).view(N, P, T).sum(1) @ tw


# --------------------------------------------------------------------------------------- (a) hand computation
def test_nelbo_terms_equal_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    B, n, vocab, mask_id = 3, 6, 7, 6
    logits = torch.randn(B, n, vocab, generator=g) * 2
    x = torch.randint(0, 5, (B, n), generator=g)
    x[:, 0] = 5  # BOS
    masked = torch.rand(B, n, generator=g) < 0.5
    masked[:, 0] = False
    masked[0, 1] = masked[2, -1] = True  # one masked position scored, one masked position that is padding
    z = torch.where(masked, mask_id, x)
    loss_mask = torch.ones(B, n, dtype=torch.bool)
    loss_mask[:, 0] = False
    loss_mask[2, -1] = False  # padding: masked but never scored
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    schedule = LogLinearSchedule(1e-3)

    got = nelbo_terms(logits, x, z, t, schedule, mask_id, loss_mask)

    want = torch.zeros(B, n, dtype=torch.float64)
    for b in range(B):
        for pos in range(n):
            if z[b, pos] == mask_id and loss_mask[b, pos]:
                row = logits[b, pos, :mask_id].double()  # the [MASK] logit removed (zero-masking)
                log_prob = row[x[b, pos]] - torch.logsumexp(row, 0)
                want[b, pos] = -log_prob / t[b].double()  # log-linear: w(t) = 1/t
    assert int((want != 0).sum()) >= 3
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- (b) NELBO = -log p(x), exactly
def test_perfect_denoiser_loglinear_nelbo_is_exact_nll():
    """Log-linear with eps = 0: the integrand t^(k-1) (1-t)^(L-k) is a polynomial of degree L-1, so 16-node
    Gauss-Legendre quadrature is exact and the only error is float32 rounding in the cross-entropy."""
    p = data_distribution(0)
    net = PerfectDenoiser(p)
    process = MaskedDiffusion(LogLinearSchedule(eps=0.0), MASK, sampling_eps=0.0)
    t, tw = gauss_legendre(16, 0.0, 1.0)
    nelbo = expected_nelbo(process, net, SEQS, t, tw)
    torch.testing.assert_close(nelbo, -p.log(), atol=1e-6, rtol=0)


def test_denoiser_ignoring_context_pays_the_mutual_information():
    """Control: predicting the marginals p(x_i) instead of the conditionals gives a strictly larger bound on
    average (the gap is the total correlation of p), so the identity above is not automatic."""
    p = data_distribution(0)
    net = PerfectDenoiser(p)
    marginal = net.table[-1]  # z = all masks: the conditionals are the marginals
    net.table = marginal.expand_as(net.table).clone()
    process = MaskedDiffusion(LogLinearSchedule(eps=0.0), MASK, sampling_eps=0.0)
    t, tw = gauss_legendre(16, 0.0, 1.0)
    nelbo = expected_nelbo(process, net, SEQS, t, tw)
    marginal_nll = -sum(marginal[i, SEQS[:, i]] for i in range(L))
    torch.testing.assert_close(nelbo, marginal_nll, atol=1e-6, rtol=0)
    assert float((p * nelbo).sum()) > float((p * -p.log()).sum()) + 1e-3


@pytest.mark.parametrize("schedule, nodes, atol", [
    (CosineSchedule(eps=0.0), 48, 1e-6),
    # alpha_1 = eps > 0 (the linear schedule needs it): the bound misses the integral over alpha in [0, eps],
    # O(eps) = 1e-9 here, far below the float32 rounding of the cross-entropies.
    (LinearSchedule(eps=1e-9), 96, 1e-6),
])
def test_perfect_denoiser_nelbo_is_exact_nll_for_any_schedule(schedule, nodes, atol):
    """alpha_0 = 1, alpha_1 = 0: substituting a = alpha_t turns the time integral into the same Beta integrals
    as for log-linear. The integrand in t is analytic (not a polynomial), so more nodes are used."""
    p = data_distribution(1)
    net = PerfectDenoiser(p)
    process = MaskedDiffusion(schedule, MASK, sampling_eps=0.0)
    t, tw = gauss_legendre(nodes, 0.0, 1.0)
    nelbo = expected_nelbo(process, net, SEQS, t, tw)
    torch.testing.assert_close(nelbo, -p.log(), atol=atol, rtol=0)


# ------------------------------------------------------------------------------- (c) Monte Carlo estimator
def test_monte_carlo_loss_is_unbiased():
    """MaskedDiffusion.loss (antithetic times over the batch, random masks) averaged over seeds matches the exact
    expectation of the same estimator: t uniform on [sampling_eps, 1], every mask pattern enumerated."""
    p = data_distribution(2)
    net = PerfectDenoiser(p)
    eps_s = 1e-3  # keeps the estimator's variance finite (w = 1/t)
    process = MaskedDiffusion(LogLinearSchedule(eps=0.0), MASK, sampling_eps=eps_s, antithetic=True)
    t, tw = gauss_legendre(16, eps_s, 1.0)
    exact = float(expected_nelbo(process, net, SEQS, t, tw).sum()) / (1.0 - eps_s)
    batch = make_batch(SEQS)  # all 27 sequences; nll_sum estimates the sum of their NELBOs
    estimates = torch.tensor([float(process.loss(net, batch, torch.Generator().manual_seed(s)).nll_sum)
                              for s in range(3000)], dtype=torch.float64)
    mean, se = float(estimates.mean()), float(estimates.std() / math.sqrt(len(estimates)))
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    assert se < 0.02 * exact  # the test has power: 4 SE is a tight window
    # The truncation at sampling_eps changes the bound only slightly.
    assert abs(exact - float(-p.log().sum())) < 0.01 * exact


# ----------------------------------------------------------------------------- (d) weights and time sampling
def test_loglinear_weight_is_exactly_one_over_t():
    t = torch.tensor([1e-4, 1e-3, 0.1, 0.37, 0.5, 0.999, 1.0], dtype=torch.float64)
    for eps in (0.0, 1e-3, 0.1):
        s = LogLinearSchedule(eps)
        assert torch.equal(s.loss_weight(t), 1.0 / t)
        generic = -s.dalpha(t) / (1.0 - s.alpha(t))  # the definition -alpha'/(1 - alpha)
        torch.testing.assert_close(s.loss_weight(t), generic, rtol=1e-12, atol=0)
        ends = s.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
        assert float(ends[0]) == 1.0 and abs(float(ends[1]) - eps) < 1e-15


@pytest.mark.parametrize("schedule", [CosineSchedule(1e-3), LinearSchedule(1e-3)])
def test_schedule_derivative_matches_finite_differences(schedule):
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    fd = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(schedule.dalpha(t), fd, rtol=1e-6, atol=1e-8)
    assert abs(float(schedule.alpha(torch.tensor(0.0, dtype=torch.float64))) - 1.0) < 1e-12
    assert abs(float(schedule.alpha(torch.tensor(1.0, dtype=torch.float64))) - schedule.eps) < 1e-12


@pytest.mark.parametrize("batch", [1, 2, 7, 64])
def test_antithetic_times_are_evenly_spaced_mod_one(batch):
    eps_s = 1e-3
    for seed in range(5):
        t = antithetic_times(batch, eps_s, torch.Generator().manual_seed(seed), "cpu").double()
        assert t.shape == (batch,)
        assert bool((t >= eps_s).all()) and bool((t <= 1.0).all())
        u = torch.sort((t - eps_s) / (1 - eps_s)).values  # undo the rescaling
        gaps = torch.diff(torch.cat((u, u[:1] + 1.0)))  # circular gaps
        torch.testing.assert_close(gaps, torch.full_like(gaps, 1.0 / batch), atol=1e-5, rtol=0)


def test_training_loss_equals_the_dense_nelbo_terms(tiny_network):
    """MaskedDiffusion.loss (whatever shortcut it takes) sums exactly the per-token terms of `nelbo_terms`, with
    padding (attention_mask) excluded, on a real backbone."""
    net = tiny_network(vocab_size=10)
    process = MaskedDiffusion(LogLinearSchedule(1e-3), 9)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 9, (4, 12), generator=g)
    x[:, 0] = 0
    attention = torch.ones_like(x, dtype=torch.bool)
    attention[2, 8:] = False
    loss_mask = attention.clone()
    loss_mask[:, 0] = False
    batch = {"input_ids": x, "loss_mask": loss_mask, "attention_mask": attention}
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    out = process.loss(net, batch, torch.Generator().manual_seed(1), t=t)
    z = process.add_noise(x, t, loss_mask, torch.Generator().manual_seed(1))  # the same draw as inside loss
    with torch.no_grad():
        terms = nelbo_terms(process.forward_logits(net, z, t, batch), x, z, t, process.schedule, 9, loss_mask)
    assert int(((z == 9) & loss_mask).sum()) > 10
    assert abs(float(out.nll_sum) - float(terms.sum())) < 1e-4 * float(terms.sum())
    assert int(out.num_tokens) == int(loss_mask.sum())
