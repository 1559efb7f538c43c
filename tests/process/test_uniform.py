"""Uniform-state diffusion (udlm) and GIDD's mix (gidd), dlm/process/uniform.py, against first principles on a
tiny vocabulary and length, by exact enumeration of every noised sequence:

- the forward rates rho_t are (beta pi)' - (alpha'/alpha) beta pi (finite differences), and the transitions they
  define have the process's marginals;
- `reverse_probs` is Bayes' rule q(z_s | z_t, x) with x_theta in place of x (and MDLM's rule for absorbing);
- the T-step discrete-time ELBO (posteriors from the transition matrices, KLs summed over every z_t) approaches
  the continuous-time bound the process trains with (its `terms` summed over every z_t, integrated over t by
  Gauss-Legendre quadrature) as T grows, and both are bounds: >= the exact -log p of the T-step model (its chain
  run over every sequence);
- the Monte Carlo `nelbo` estimates that integral.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from dlm.process import ModelDescription, make_process
from dlm.process.mdlm import MaskedDiffusion
from dlm.process.schedules import LogLinearSchedule
from dlm.process.uniform import GIDDConfig, UniformConfig

V, MASK, L = 4, 3, 3  # tokens 0, 1, 2 and [MASK]; sequences of 3


def build(name: str, **fields):
    cfg = (UniformConfig if name == "udlm" else GIDDConfig)(**fields)
    return make_process(cfg, ModelDescription(vocab_size=V, d_model=32, mask_id=MASK, context=8))


PROCESSES = [("udlm", {}), ("udlm", {"schedule": "cosine"}), ("gidd", {}), ("gidd", {"p_u": 0.5, "gamma": 2.0})]
IDS = ["udlm", "udlm-cosine", "gidd", "gidd-pu0.5-gamma2"]


def marginal(process, t: float) -> np.ndarray:
    """Q_t (V, V): row x is q_t(. | x), from the process's masses (alpha_t, m_t, u_t)."""
    a, m, u = (float(v) for v in process.masses(torch.tensor(t, dtype=torch.float64)))
    noise = np.full(V, u / (V - 1))
    noise[MASK] = m
    return a * np.eye(V) + noise[None, :]


def transition(process, s: float, t: float) -> np.ndarray:
    """Q_{t|s} (V, V): alpha_{t|s} I + rows of beta_t pi_t - alpha_{t|s} beta_s pi_s (module docstring), with
    alpha = q(0|0) - q(0|1) and beta pi = q(.|0) - alpha e_0 read off the marginals."""
    q_s, q_t = marginal(process, s), marginal(process, t)
    a_s, a_t = q_s[0, 0] - q_s[1, 0], q_t[0, 0] - q_t[1, 0]
    noise_s, noise_t = q_s[0] - a_s * np.eye(V)[0], q_t[0] - a_t * np.eye(V)[0]
    ratio = a_t / a_s
    return ratio * np.eye(V) + (noise_t - ratio * noise_s)[None, :]


@pytest.mark.parametrize("name,fields", PROCESSES, ids=IDS)
def test_rates_are_the_derivative_of_the_marginals_and_transitions_compose(name, fields):
    process = build(name, **fields)
    for t in (0.1, 0.37, 0.5, 0.81):
        tt = torch.tensor([t], dtype=torch.float64)
        h = 1e-6
        a, m, u = process.masses(tt)
        da = (process.masses(tt + h)[0] - process.masses(tt - h)[0]) / (2 * h)
        dm = (process.masses(tt + h)[1] - process.masses(tt - h)[1]) / (2 * h)
        du = (process.masses(tt + h)[2] - process.masses(tt - h)[2]) / (2 * h)
        rho_m, rho_u = process.rates(tt)
        assert float(rho_m) == pytest.approx(float(dm - da / a * m), rel=1e-5, abs=1e-8)
        assert float(rho_u) == pytest.approx(float(du - da / a * u), rel=1e-5, abs=1e-8)
        assert float(rho_m) >= 0 and float(rho_u) >= 0 and float(a + m + u) == pytest.approx(1.0)
    for s, t in ((0.0, 0.3), (0.2, 0.5), (0.5, 0.9), (0.7, 1.0)):
        step = transition(process, s, t)
        assert (step >= -1e-12).all() and np.allclose(step.sum(1), 1.0)
        assert np.allclose(marginal(process, s) @ step, marginal(process, t), atol=1e-12)
    if name == "gidd":  # the uniform share peaks at t = 1/2, where it is p_u; all [MASK] at t = 1
        shares = [float(process.masses(torch.tensor(t, dtype=torch.float64))[2]) for t in np.linspace(0, 1, 101)]
        assert max(shares) == pytest.approx(process.p_u) and int(np.argmax(shares)) == 50
        assert np.allclose(marginal(process, 1.0), np.eye(V)[MASK][None, :])


def bayes_reverse(process, probs: np.ndarray, z: int, t: float, s: float) -> np.ndarray:
    """p(z_s | z_t = z) = Q_{t|s}[y, z] (x Q_s)[y] / (x Q_t)[z] with x = probs (V,): Bayes' rule, x plugged in."""
    step, q_s, q_t = transition(process, s, t), marginal(process, s), marginal(process, t)
    return step[:, z] * (probs @ q_s) / (probs @ q_t)[z]


@pytest.mark.parametrize("name,fields", PROCESSES + [("mdlm", {})], ids=IDS + ["mdlm"])
def test_the_reverse_step_is_bayes_rule_with_x_theta_plugged_in(name, fields):
    g = torch.Generator().manual_seed(0)
    process = MaskedDiffusion(LogLinearSchedule(1e-3), MASK) if name == "mdlm" else build(name, **fields)
    ref = build("gidd") if name == "mdlm" else process
    for t, s in ((0.9, 0.6), (0.5, 0.45), (0.3, 0.0), (1.0, 0.7)):
        probs = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
        probs[MASK] = 0
        probs /= probs.sum()
        for z in range(V):
            if (probs.numpy() @ marginal(ref, t))[z] == 0:
                continue  # z_t = z is impossible (udlm's [MASK]; any token at gidd's t = 1)
            got = process.reverse_probs(probs[None], torch.tensor([z]), torch.tensor([t]), torch.tensor([s]))[0]
            if name == "mdlm":  # MDLM's ancestral rule
                a_t, a_s = 1 - (1 - 1e-3) * t, 1 - (1 - 1e-3) * s
                want = np.eye(V)[z] if z != MASK else (a_s - a_t) / (1 - a_t) * probs.numpy() + \
                    (1 - a_s) / (1 - a_t) * np.eye(V)[MASK]
            else:
                want = bayes_reverse(ref, probs.numpy(), z, t, s)
            assert np.allclose(got.numpy(), want, atol=1e-12), (name, t, s, z)


# ------------------------------------------------------------------------------------------ the bound
def states(name: str) -> np.ndarray:
    """(S, L): every noised sequence (udlm never holds [MASK])."""
    alphabet = range(V - 1) if name == "udlm" else range(V)
    return np.array(list(itertools.product(alphabet, repeat=L)))


@pytest.fixture
def model_probs(tiny_network):
    """Raw logits and x_theta (S, L, V) of a tiny random network (no time conditioning: it depends on z only) at
    every state."""
    net = tiny_network(V, seed=1)
    out = {}
    for name in ("udlm", "gidd"):
        process = build(name)
        zs = torch.tensor(states(name))
        with torch.no_grad():
            logits = process.forward_logits(net, zs, None)
        out[name] = (logits.double(), torch.softmax(process.denoise(logits).double(), -1).numpy())
    return out


def prior(name: str) -> np.ndarray:
    return np.eye(V)[MASK] if name == "gidd" else np.r_[np.full(V - 1, 1 / (V - 1)), 0.0]


def seq_prob(qz: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """(S,): the product over positions of qz[l, z^l] for every state; qz (L, V)."""
    return np.prod(qz[np.arange(L)[None, :], zs], axis=1)


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (a state z_t that cannot occur: it has no weight)."""
    num, den = np.broadcast_arrays(num, den)
    return np.divide(num, den, out=np.zeros(num.shape), where=den > 0)


def discrete_elbo(process, name, x, probs, T) -> float:
    """The T-step NELBO of x (L,): prior KL + sum_i E_{z_t} sum_l KL(q(z_s | z_t, x) || p_theta(z_s | z_t))."""
    zs = states(name)
    grid = np.linspace(0.0, 1.0, T + 1)
    q1 = marginal(process, 1.0)[x]  # (L, V)
    p1 = prior(name)
    total = sum(float(np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1) / np.where(q > 0, p1, 1)), 0.0)))
                for q in q1)
    for i in range(1, T + 1):
        s, t = grid[i - 1], grid[i]
        step, q_s, q_t = transition(process, s, t), marginal(process, s), marginal(process, t)
        weight = seq_prob(q_t[x], zs)  # (S,)
        rows, cols = np.arange(len(zs))[:, None], np.arange(L)[None, :]
        post = ratio(step.T[zs] * q_s[x][None], q_t[x[None, :], zs][..., None])  # (S, L, V): q(z_s = y | z_t, x)
        model = ratio(step.T[zs] * (probs @ q_s), (probs @ q_t)[rows, cols, zs][..., None])  # p_theta(z_s | z_t)
        kl = np.where(post > 0, post * (np.log(np.where(post > 0, post, 1)) - np.log(np.where(post > 0, model, 1))),
                      0.0).sum((1, 2))
        total += float(weight @ kl)
    return total


def exact_nll(process, name, x, probs, T) -> float:
    """-log p_T(x): the T-step model's chain from its prior, run over every state, at x."""
    zs = states(name)
    grid = np.linspace(0.0, 1.0, T + 1)
    full = np.array(list(itertools.product(range(V), repeat=L)))  # z_0 may be any sequence
    p = seq_prob(np.tile(prior(name), (L, 1)), zs)  # (S,)
    for i in range(T, 0, -1):
        s, t = grid[i - 1], grid[i]
        step, q_s, q_t = transition(process, s, t), marginal(process, s), marginal(process, t)
        norm = (probs @ q_t)[np.arange(len(zs))[:, None], np.arange(L)[None, :], zs]
        per = ratio(step.T[zs] * (probs @ q_s), norm[..., None])  # (S, L, V): p(z_s^l = y | z_t)
        targets = zs if i > 1 else full
        move = np.prod(per[:, np.arange(L)[None, :], targets], axis=2)  # (S, S')
        p = p @ move
        if i > 1:
            continue
        index = {tuple(z): k for k, z in enumerate(full)}
        return -math.log(p[index[tuple(x)]])


def continuous_bound(process, name, x, logits, lo=0.0, hi=1.0, nodes=400) -> float:
    """prior KL + int_lo^hi sum_z q_t(z|x) sum_l terms_l(z, t) dt, with the process's own `terms`, t = lo + (hi -
    lo)(1 - cos(pi v))/2 for Gauss-Legendre v (which tames the end-point singularities)."""
    zs = states(name)
    v, w = np.polynomial.legendre.leggauss(nodes)
    v, w = (v + 1) / 2, w / 2
    ts = lo + (hi - lo) * (1 - np.cos(np.pi * v)) / 2
    dts = (hi - lo) * np.pi / 2 * np.sin(np.pi * v) * w
    xs = torch.tensor(x).repeat(len(zs))
    flat = logits.reshape(-1, V)
    total = process.prior_kl() * L
    for t, dt in zip(ts, dts):
        weight = seq_prob(marginal(process, t)[x], zs)  # (S,)
        terms = process.terms(flat, xs, torch.tensor(zs).reshape(-1), torch.full((len(xs),), t, dtype=torch.float64))
        total += dt * float(weight @ terms.double().reshape(len(zs), L).sum(1).numpy())
    return total


@pytest.mark.parametrize("name", ["udlm", "gidd"])
def test_the_discrete_elbo_approaches_the_continuous_bound_and_both_bound_the_likelihood(name, model_probs):
    process = build(name)
    logits, probs = model_probs[name]
    for x in (np.array([0, 1, 2]), np.array([2, 2, 0])):
        bound = continuous_bound(process, name, x, logits)
        gaps, last = [], None
        for T in (4, 16, 64, 256, 1024):
            elbo = discrete_elbo(process, name, x, probs, T)
            nll = exact_nll(process, name, x, probs, T)
            assert elbo >= nll - 1e-9, (T, elbo, nll)  # a bound on its own T-step model
            gaps.append(abs(elbo - bound))
            last = elbo, nll
        assert all(b < a for a, b in zip(gaps, gaps[1:])), gaps  # monotone approach
        assert gaps[-1] < 2e-3 * bound, (gaps, bound)
        assert bound >= last[1] - 2e-3 * bound  # the limit bounds the likelihood of the many-step model too


@pytest.mark.parametrize("name", ["udlm", "gidd"])
def test_the_monte_carlo_nelbo_estimates_the_integral(name, tiny_network):
    process = build(name)
    net = tiny_network(V, seed=1)
    x = torch.tensor([[0, 1, 2]]).repeat(512, 1)
    batch = {"input_ids": x, "loss_mask": torch.ones_like(x, dtype=torch.bool)}
    with torch.no_grad():
        logits = process.forward_logits(net, torch.tensor(states(name)), None)
        out = process.loss(net, batch, torch.Generator().manual_seed(0))
    hi = process.t_max
    eps = process.sampling_eps
    want = continuous_bound(process, name, np.array([0, 1, 2]), logits.double(), eps, hi) / (1 - eps)
    want += process.prior_kl() * L * (1 - 1 / (1 - eps))  # the prior term is not rescaled by 1/(1 - eps)
    values = out.nll_per_row.double()
    se = float(values.std()) / math.sqrt(len(values))
    assert float(values.mean()) == pytest.approx(want, abs=4 * se + 1e-3)
