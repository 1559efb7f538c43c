"""Any-order likelihoods (dlm/process/any_order.py) by enumeration on a tiny vocabulary and length: every order's
model is normalised, the mixture over all orders is the exact likelihood, the importance-weighted estimate is
non-increasing in K in expectation, above -log p, and converges to it; Eso-LM's order distribution is the one its
sampler draws."""

import itertools
import math

import pytest
import torch

from dlm.process import MaskedDiffusion
from dlm.process.any_order import importance_weighted_nll, order_nll, random_ranks, ranks_of_keys
from dlm.process.esolm import EsoLM
from dlm.process.esolm_mask import CAUSAL, CLEAN_BIDIRECTIONAL
from dlm.process.schedules import LogLinearSchedule

V, MASK, L = 5, 4, 4  # tokens 0..3, [MASK] = 4, sequences of 4 tokens: 256 of them, 24 orders
ORDERS = list(itertools.permutations(range(L)))
ALL_X = torch.tensor(list(itertools.product(range(MASK), repeat=L)))  # (256, L)


def process(name):
    if name == "mdlm":
        return MaskedDiffusion(LogLinearSchedule(1e-3), MASK)
    return EsoLM(MASK, 1.0, attention=CAUSAL if name == "esolm_causal" else CLEAN_BIDIRECTIONAL)


def ranks_of(order, B):
    """(B, L) ranks of the order (a tuple of positions, first revealed first)."""
    r = torch.empty(L, dtype=torch.long)
    r[list(order)] = torch.arange(L)
    return r.expand(B, L)


def all_order_nlls(proc, net):
    """(256, 24) -log p(x | pi) of every sequence under every order."""
    b = {"input_ids": ALL_X, "loss_mask": torch.ones_like(ALL_X, dtype=torch.bool)}
    return torch.stack([order_nll(proc, net, b, ranks_of(o, len(ALL_X))) for o in ORDERS], 1).double()


@pytest.fixture(scope="module")
def nlls(request):
    from tests.conftest import Transformer, ModelConfig  # noqa: F401  (the tiny network of conftest, built here)

    torch.manual_seed(0)
    net = Transformer(ModelConfig(n_layer=2, n_head=2, d_model=32, context=32, vocab_size=V))
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)
    net.eval()
    return net, {name: all_order_nlls(process(name), net) for name in ("mdlm", "esolm_causal", "esolm_clean_bi")}


@pytest.mark.parametrize("name", ["mdlm", "esolm_causal", "esolm_clean_bi"])
def test_every_order_is_a_normalised_model_and_the_mixture_is_exact(nlls, name):
    """sum_x p(x | pi) = 1 for every order, hence p(x) = mean_pi p(x | pi) sums to 1: log-mean-exp over all L!
    orders is an exact likelihood (not a bound)."""
    table = nlls[1][name]
    assert torch.allclose((-table).exp().sum(0), torch.ones(len(ORDERS), dtype=torch.float64), atol=1e-5)
    log_p = torch.logsumexp(-table, 1) - math.log(len(ORDERS))
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-5)
    assert bool((table.mean(1) >= -log_p - 1e-9).all())  # L_AO >= -log p (Jensen), for every x


@pytest.mark.parametrize("name", ["mdlm", "esolm_causal"])
def test_importance_weighting_is_monotone_in_k_in_expectation_and_tends_to_the_exact_nll(nlls, name):
    """E[L_AO^K] over K orders drawn uniformly with replacement, computed exactly by enumerating K-tuples for
    K = 1, 2, 3: non-increasing, all >= -log p, K = 1 is L_AO."""
    table = nlls[1][name][:16]  # 16 sequences are enough
    exact = -(torch.logsumexp(-table, 1) - math.log(len(ORDERS)))
    expected = []
    for K in (1, 2, 3):
        tuples = torch.tensor(list(itertools.product(range(len(ORDERS)), repeat=K)))  # (24^K, K)
        iw = -(torch.logsumexp(-table[:, tuples], 2) - math.log(K))  # (16, 24^K)
        expected.append(iw.mean(1))
    assert torch.allclose(expected[0], table.mean(1))
    assert bool((expected[0] >= expected[1] - 1e-12).all() and (expected[1] >= expected[2] - 1e-12).all())
    assert bool((expected[2] >= exact - 1e-12).all()) and bool((expected[0] > exact + 1e-6).any())


@pytest.mark.parametrize("name", ["mdlm", "esolm_causal", "esolm_clean_bi"])
def test_the_estimator_converges_to_the_enumerated_likelihood(nlls, name):
    net, table = nlls[0], nlls[1][name]
    exact = -(torch.logsumexp(-table, 1) - math.log(len(ORDERS)))
    rows = [0, 77, 200]
    b = {"input_ids": ALL_X[rows], "loss_mask": torch.ones(3, L, dtype=torch.bool)}
    K = 300
    iw, ao = importance_weighted_nll(process(name), net, b, K, torch.Generator().manual_seed(0))
    # -log of a mean of K weights p(x | pi): its error is about -(relative error of the mean), whose standard
    # deviation is sd(p) / (E[p] sqrt(K)) over the uniform order (the delta method); allow 4 of them.
    p = (-table[rows]).exp()
    rel_sd = p.std(1, unbiased=False) / p.mean(1) / math.sqrt(K)
    assert bool(((iw - exact[rows]).abs() <= 4 * rel_sd + 1e-6).all()), (iw, exact[rows], rel_sd)
    ao_sd = table[rows].std(1, unbiased=False) / math.sqrt(K)
    assert bool(((ao - table[rows].mean(1)).abs() <= 4 * ao_sd + 1e-6).all())  # the mean single-order NLL: L_AO


def q_esolm(order, a0):
    """The probability that Eso-LM's sampler (one token per step) reveals in this order: m ~ Binomial(L, a0) drafted
    positions, a uniform permutation's first m, then the other L - m left to right."""
    total = 0.0
    for m in range(L + 1):
        tail = order[m:]
        if list(tail) == sorted(tail):
            total += math.comb(L, m) * a0 ** m * (1 - a0) ** (L - m) * math.factorial(L - m) / math.factorial(L)
    return total


def test_esolm_orders_follow_its_sampler_and_give_a_normalised_exact_likelihood(nlls):
    a0 = 0.5
    eso = EsoLM(MASK, a0, attention=CAUSAL)
    q = torch.tensor([q_esolm(o, a0) for o in ORDERS], dtype=torch.float64)
    assert float(q.sum()) == pytest.approx(1.0)
    draws = random_ranks(eso, torch.ones(20000, L, dtype=torch.bool), torch.Generator().manual_seed(0))
    index = {o: i for i, o in enumerate(ORDERS)}
    counts = torch.zeros(len(ORDERS), dtype=torch.float64)
    for row in draws.argsort(1).tolist():
        counts[index[tuple(row)]] += 1
    assert torch.allclose(counts / 20000, q, atol=0.01)
    table = nlls[1]["esolm_causal"]  # the same denoiser at any alpha0: only the orders' law changes
    log_p = torch.logsumexp(-table + q.log(), 1)
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-5)


def test_ranks_of_keys_and_per_row_independence(nlls):
    lm = torch.tensor([[False, True, True, True]])
    assert ranks_of_keys(torch.tensor([[0.0, 0.7, 0.1, 0.5]]), lm).tolist() == [[-1, 2, 0, 1]]
    net = nlls[0]
    b = {"input_ids": ALL_X[[3, 90, 140]], "loss_mask": torch.ones(3, L, dtype=torch.bool)}
    b["loss_mask"][:, 0] = False  # BOS-like context
    gens = lambda rows: [torch.Generator().manual_seed(5 + r) for r in rows]  # noqa: E731
    together, _ = importance_weighted_nll(process("mdlm"), net, b, 4, gens(range(3)))
    alone = importance_weighted_nll(process("mdlm"), net, {k: v[1:2] for k, v in b.items()}, 4, gens([1]))[0]
    assert float(together[1]) == pytest.approx(float(alone[0]), rel=1e-6)


def test_a_process_without_an_any_order_denoiser_is_refused():
    from dlm.process import Autoregressive

    with pytest.raises(ValueError, match="left to right"):
        importance_weighted_nll(Autoregressive(), None, {"input_ids": ALL_X[:1], "loss_mask": torch.ones(1, L,
                                dtype=torch.bool)}, 2, None)


def test_mdlms_nelbo_is_the_mean_any_order_nll(nlls):
    """For a time-independent denoiser MDLM's log-linear NELBO equals E_pi[-log p(x | pi)] (the number of masks k is
    Binomial(n, t) and int_0^1 (1/t) k Bin(k; n, t) dt = 1 for every k), so it is the K = 1 end of the importance-
    weighted chain: NELBO = L_AO >= L_AO^K. The NELBO here is exact, not Monte Carlo (whose 1/t weight makes it
    heavy-tailed): MDLM's own per-token terms (`nelbo_terms`) on each of the 15 masked sets, integrated over t with
    the sets' probabilities by the trapezoid rule; it matches the enumeration up to eps = 1e-3 (~0.2 %)."""
    from dlm.process import nelbo_terms

    net, table = nlls[0], nlls[1]["mdlm"]
    mdlm = process("mdlm")
    x, lm = ALL_X[:1], torch.ones(1, L, dtype=torch.bool)
    t = torch.linspace(mdlm.sampling_eps, 1.0, 100001, dtype=torch.float64)
    integrand = torch.zeros_like(t)
    for bits in itertools.product([False, True], repeat=L):
        masked = torch.tensor([bits])
        if not masked.any():
            continue
        z = torch.where(masked, MASK, x)
        with torch.no_grad():
            terms = nelbo_terms(net(z), x, z, torch.ones(1), mdlm.schedule, MASK, lm)  # w(1) = 1: the CE sum
        p = 1.0 - mdlm.schedule.alpha(t)  # the mask rate
        k = int(masked.sum())
        integrand += mdlm.schedule.loss_weight(t) * p ** k * (1 - p) ** (L - k) * float(terms.sum())
    exact = float(torch.trapezoid(integrand, t))
    assert exact == pytest.approx(float(table[0].mean()), rel=0.005)
    assert exact >= float(-(torch.logsumexp(-table[0], 0) - math.log(len(ORDERS))))  # >= -log p


@pytest.mark.parametrize("name", ["mdlm", "esolm_clean_bi"])
def test_steps_batched_into_one_call_give_the_one_call_per_step_values(nlls, name):
    from dlm.process.any_order import mdlm_order_nll

    net, proc = nlls[0], process(name)
    b = {"input_ids": ALL_X[[5, 60, 199]], "loss_mask": torch.ones(3, L, dtype=torch.bool),
         "attention_mask": torch.tensor([[True] * 4, [True] * 4, [True, True, True, False]])}
    b["loss_mask"] = b["loss_mask"] & b["attention_mask"]
    ranks = random_ranks(proc, b["loss_mask"], torch.Generator().manual_seed(2))
    run = mdlm_order_nll if name == "mdlm" else proc.stepwise_order_nll
    one_by_one = run(proc, net, b, ranks, rows_per_call=1) if name == "mdlm" else run(net, b, ranks, rows_per_call=1)
    batched = run(proc, net, b, ranks) if name == "mdlm" else run(net, b, ranks)
    assert torch.allclose(one_by_one, batched, rtol=1e-5)
