"""SEDD (dlm/process/sedd.py, dlm/process/score_graphs.py) against first principles: the closed-form denoising score
entropy of both graphs against a brute-force sum whose transition probabilities come from a matrix exponential of
the rate matrix; RADD (SUBS probabilities mapped to scores give MDLM's NELBO term, sample by sample) by exact
enumeration and by Monte Carlo with the same draws; the shared process contract on the uniform graph too; and
`dlm train / eval / sample` on a SEDD model, resuming exactly."""

import inspect
import itertools
import math

import pytest
import torch

from dlm.build import describe_model
from dlm.config import ModelConfig
from dlm.data.batch import make_batch
from dlm.process import MaskedDiffusion, make_process, nelbo_terms, subs_logits
from dlm.process.schedules import LogLinearSchedule
from dlm.process.score_graphs import LogLinearNoise, GeometricNoise, score_entropy
from dlm.process.sedd import SEDD, SEDDConfig

V, MASK = 6, 5  # five tokens and [MASK]


# ------------------------------------------------------------------------------------------ first principles
def rate_matrix(graph: str, n: int, mask_id: int | None = None) -> torch.Tensor:
    """R (n, n) float64: R[a, b] the rate of a -> b (a ≠ b), rows summing to 0."""
    if graph == "absorbing":
        R = torch.zeros(n, n, dtype=torch.float64)
        R[:, mask_id] = 1.0
        R[mask_id, mask_id] = 0.0
    else:
        R = torch.full((n, n), 1.0 / n, dtype=torch.float64)
    R.fill_diagonal_(0.0)
    return R - torch.diag(R.sum(1))


def brute_dse(graph, log_s, x, x0, sigma, mask_id=None) -> float:
    """sum_{y≠x} Q(x, y) [s_y - r_y log s_y + K(r_y)], Q(x, y) = R[y, x], r_y = p(y|x0)/p(x|x0) with
    p(·|x0) = expm(σ R)[x0]; K(0) = 0 (its limit). One position, written naively."""
    n = log_s.shape[-1]
    R = rate_matrix(graph, n, mask_id)
    p = torch.linalg.matrix_exp(sigma * R)[x0]
    total = 0.0
    for y in range(n):
        if y == x or R[y, x] == 0:
            continue
        r = float(p[y] / p[x])
        k = r * (math.log(r) - 1.0) if r > 0 else 0.0
        total += float(R[y, x]) * (math.exp(float(log_s[y])) - r * float(log_s[y]) + k)
    return total


def test_rate_matrices_give_the_spec_marginals():
    sigma = 0.7
    a = math.exp(-sigma)
    P = torch.linalg.matrix_exp(sigma * rate_matrix("absorbing", V, MASK))
    assert P[2, 2] == pytest.approx(a) and P[2, MASK] == pytest.approx(1 - a) and P[MASK, MASK] == pytest.approx(1.0)
    P = torch.linalg.matrix_exp(sigma * rate_matrix("uniform", V))
    assert P[2, 2] == pytest.approx(a + (1 - a) / V) and P[2, 3] == pytest.approx((1 - a) / V)


@pytest.mark.parametrize("graph", ["absorbing", "uniform"])
def test_closed_form_dse_equals_the_brute_force_sum(graph):
    g = torch.Generator().manual_seed(0)
    n = 40
    log_s = torch.randn(n, V, generator=g, dtype=torch.float64)
    x0 = torch.randint(0, MASK, (n,), generator=g)
    if graph == "absorbing":  # a position is x0 or [MASK]
        x = torch.where(torch.rand(n, generator=g) < 0.7, MASK, x0)
    else:  # anything, x0 included
        x = torch.where(torch.rand(n, generator=g) < 0.3, x0, torch.randint(0, V, (n,), generator=g))
    log_s = log_s.scatter(-1, x[:, None], 0.0)  # log s = 0 at the current token
    sigma = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-6, 3, generator=g))  # 2.5e-3 .. 20
    got = score_entropy(graph, log_s, x, x0, sigma, MASK)
    want = torch.tensor([brute_dse(graph, log_s[i], int(x[i]), int(x0[i]), float(sigma[i]), MASK) for i in range(n)], dtype=torch.float64)
    assert torch.allclose(got.double(), want, rtol=2e-5, atol=1e-5)
    assert bool((got > -1e-5).all())  # non-negative: each term s - r log s + K(r) >= 0
    if graph == "absorbing":
        assert bool((got[x != MASK] == 0).all()) and bool((got[x == MASK] > 0).all())


@pytest.mark.parametrize("graph", ["absorbing", "uniform"])
def test_dse_vanishes_at_the_true_ratio_of_one_clean_token(graph):
    """With one x0, the minimiser of s - r log s + K(r) is s = r: the DSE is 0 there, so K makes it a bound."""
    sigma = torch.tensor([0.3, 2.0, 9.0], dtype=torch.float64)
    x0 = torch.tensor([1, 2, 3])
    x = torch.full((3,), MASK) if graph == "absorbing" else torch.tensor([4, 2, 0])
    P = torch.stack([torch.linalg.matrix_exp(s * rate_matrix(graph, V, MASK))[int(c)] for s, c in zip(sigma, x0)])
    r = P / P.gather(-1, x[:, None])  # p(y|x0)/p(x|x0)
    log_s = r.clamp_min(1e-300).log()
    got = score_entropy(graph, log_s, x, x0, sigma, MASK)
    assert torch.allclose(got.double(), torch.zeros(3, dtype=torch.float64), atol=2e-5)
    assert bool((score_entropy(graph, log_s + 0.3, x, x0, sigma, MASK) > 0).all())  # any other score: > 0


def test_noise_levels_and_rates():
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64).requires_grad_()
    for noise in (LogLinearNoise(1e-3), GeometricNoise(1e-4, 20.0)):
        rate, = torch.autograd.grad(noise.total(t).sum(), t)
        assert torch.allclose(noise.rate(t.detach()), rate, rtol=1e-10)
    t = t.detach()
    assert torch.allclose(torch.exp(-LogLinearNoise(1e-3).total(t)), LogLinearSchedule(1e-3).alpha(t))
    assert float(GeometricNoise().total(torch.tensor(1.0))) == pytest.approx(20.0)


# ------------------------------------------------------------------------------------------ RADD
def radd_dse_terms(logits, x, z, t, mdlm) -> torch.Tensor:
    """(B, L): σ'(t) times the brute-force DSE of each position, with MDLM's SUBS probabilities mapped to scores
    (`MaskedDiffusion.log_score`, RADD) and σ̄, σ' from the log-linear noise, not from MDLM's schedule."""
    noise = LogLinearNoise(1e-3)
    log_s = mdlm.log_score(logits, z, t).double()
    sigma, rate = noise.total(t.double()), noise.rate(t.double())
    out = torch.zeros(z.shape, dtype=torch.float64)
    for b, l in itertools.product(range(z.shape[0]), range(z.shape[1])):
        out[b, l] = rate[b] * brute_dse("absorbing", log_s[b, l], int(z[b, l]), int(x[b, l]), float(sigma[b]), MASK)
    return out


def test_radd_scores_give_mdlms_nelbo_term_by_exact_enumeration(tiny_network):
    """For a tiny vocabulary and length, the expected DSE over every masking pattern z of x at time t (weights
    alpha^clean (1-alpha)^masked) equals MDLM's expected NELBO term, and so does every single pattern's."""
    net, mdlm = tiny_network(V), MaskedDiffusion(LogLinearSchedule(1e-3), MASK)
    L = 3
    x = torch.tensor([[0, 3, 1]])
    loss_mask = torch.ones(1, L, dtype=torch.bool)
    for t_value in (0.05, 0.4, 0.93):
        t = torch.tensor([t_value])
        alpha = float(mdlm.alpha(t))
        expect_dse = expect_mdlm = 0.0
        for pattern in itertools.product([False, True], repeat=L):
            masked = torch.tensor([pattern])
            z = torch.where(masked, MASK, x)
            with torch.no_grad():
                logits = net(z)
            weight = (1 - alpha) ** sum(pattern) * alpha ** (L - sum(pattern))
            mdlm_terms = nelbo_terms(logits, x, z, t, mdlm.schedule, MASK, loss_mask).double()
            dse_terms = radd_dse_terms(logits, x, z, t, mdlm)
            assert torch.allclose(dse_terms, mdlm_terms, rtol=1e-4, atol=1e-6), (t_value, pattern)
            expect_dse += weight * float(dse_terms.sum())
            expect_mdlm += weight * float(mdlm_terms.sum())
        assert expect_dse == pytest.approx(expect_mdlm, rel=1e-5) and expect_mdlm > 0


class RaddNetwork(torch.nn.Module):
    """A network whose output, read by SEDD-absorbing (scale_by_sigma: log s = out - log(e^σ̄ - 1) - log(N - 1)),
    is RADD's score of an MDLM network's SUBS probabilities: out = log x_theta + log(N - 1)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, *args, **kw):
        out = self.net(*args, **kw)
        return subs_logits(out, MASK).log_softmax(-1) + math.log(out.shape[-1] - 1)


def test_radd_by_monte_carlo_with_the_same_draws(tiny_network):
    """SEDD-absorbing with log-linear noise draws MDLM's t and z_t from the same generator; with RADD scores its
    per-row Monte Carlo bound is MDLM's, and its training loss too."""
    net = tiny_network(V)
    mdlm = MaskedDiffusion(LogLinearSchedule(1e-3), MASK)
    sedd = make_process(SEDDConfig(), describe_model(net.cfg, MASK))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MASK, (4, 12), generator=g)
    batch = make_batch(ids, torch.ones_like(ids, dtype=torch.bool))
    a = mdlm.nelbo(net, batch, 8, [torch.Generator().manual_seed(10 + r) for r in range(4)])
    b = sedd.nelbo(RaddNetwork(net), batch, 8, [torch.Generator().manual_seed(10 + r) for r in range(4)])
    assert torch.allclose(a.nll_per_row, b.nll_per_row, rtol=1e-5) and float(a.nll_sum) > 0
    la = mdlm.loss(net, batch, torch.Generator().manual_seed(3))
    lb = sedd.loss(RaddNetwork(net), batch, torch.Generator().manual_seed(3))
    assert float(lb.loss.detach()) == pytest.approx(float(la.loss.detach()), rel=1e-5)
    # SEDD's own (unnormalised) scores give another, larger-or-equal bound than their normalised RADD form
    own = sedd.nelbo(net, batch, 8, [torch.Generator().manual_seed(10 + r) for r in range(4)])
    assert not torch.allclose(own.nll_per_row, b.nll_per_row, rtol=1e-3)


def test_sedd_absorbing_denoise_is_the_normalised_score():
    sedd = SEDD("absorbing", LogLinearNoise(), MASK)
    raw = torch.randn(2, 3, V)
    z = torch.full((2, 3), MASK)
    t = torch.tensor([0.3, 0.8])
    s = sedd.log_score(raw, z, t).exp()[..., :MASK]
    p = sedd.denoise(raw).softmax(-1)[..., :MASK]
    assert torch.allclose(s / s.sum(-1, keepdim=True), p, atol=1e-6)
    assert bool((sedd.denoise(raw)[..., MASK] == float("-inf")).all())


# ------------------------------------------------------------------------------------------ the contract, uniform
def uniform_sedd(noise: str):
    from dlm.build import build_process
    from dlm.config import build_config

    cfg = build_config(["model.context=16", "model.d_model=32", "data.vocab_size=300", "process=sedd",
                        "process.graph=uniform", f"process.noise={noise}"])
    cfg.model.vocab_size = 13
    return build_process(cfg, 12)


def contract_checks():
    from tests.process import test_contract as contract

    names = ["test_loss_is_finite_and_differentiable", "test_bound_is_non_negative_and_deterministic",
             "test_per_row_generators_make_a_rows_bound_independent_of_its_batch", "test_prior_and_parameterisation",
             "test_refuses_samplers_it_cannot_serve", "test_is_a_module_whose_state_round_trips_and_is_optimised",
             "test_it_knows_its_model_and_says_what_its_likelihood_is",
             "test_per_row_values_sum_to_the_totals_and_equal_each_row_alone", "test_given_positions_are_never_corrupted",
             "test_given_positions_are_never_scored"]
    return [getattr(contract, n) for n in names]


@pytest.mark.parametrize("noise", ["geometric", "loglinear"])
@pytest.mark.parametrize("check", contract_checks(), ids=lambda f: f.__name__)
def test_the_uniform_graph_passes_the_process_contract(check, noise, tiny_network, monkeypatch):
    """The shared contract tests (tests/process/test_contract.py) with `process=sedd process.graph=uniform`: the
    contract module builds its process by `make(name)`, here the uniform SEDD."""
    from tests.process import test_contract as contract

    monkeypatch.setattr(contract, "make", lambda name: uniform_sedd(noise))
    assert uniform_sedd(noise).corruption == "uniform"
    kwargs = {"name": "sedd"}
    if "tiny_network" in inspect.signature(check).parameters:
        kwargs["tiny_network"] = tiny_network
    check(**kwargs)


def test_config_errors_name_the_field():
    from dlm.config import ConfigError, build_config

    for bad, match in [("process.graph=nope", "process.graph"), ("process.noise=cosine", "process.noise"),
                       ("process.sigma_min=30", "sigma_min"), ("process.sampling_eps=1.5", "sampling_eps"),
                       ("trainer.chunked_ce=64", "trainer.chunked_ce")]:
        with pytest.raises((ValueError, ConfigError), match=match):
            build_config(["process=sedd", bad])


# ------------------------------------------------------------------------------------------ dlm train / eval / sample
def test_sedd_uniform_trains_resumes_exactly_evaluates_and_samples(micro_args, tmp_path, capsys):
    """`dlm train process=sedd process.graph=uniform`: a run stopped at step 8 and restarted with the same command
    ends bit-identical to the uninterrupted run; `dlm eval` reports the bound; `dlm sample --sampler euler` samples."""
    from dlm.cli import main
    from dlm.config import build_config
    from dlm.train.run import train
    from tests.train.test_resume import assert_identical_runs

    extra = ("process=sedd", "process.graph=uniform", "process.noise=geometric", "model.time_conditioning=true")
    a, b = tmp_path / "A", tmp_path / "B"
    assert main(["train", *micro_args(a, *extra)]) == 0
    train(build_config(micro_args(b, *extra, "trainer.max_steps=8")))
    train(build_config(micro_args(b, *extra)))
    assert_identical_runs(a, b)
    capsys.readouterr()
    assert main(["eval", str(a / "model"), "--num-t-samples", "2", "--max-rows", "4"]) == 0
    out = capsys.readouterr().out
    assert "bound" in out.lower() or "nelbo" in out.lower(), out
    assert main(["sample", str(a / "model"), "--sampler", "euler", "-o", "steps=4", "--num-samples", "1",
                 "--length", "12"]) == 0
    out = capsys.readouterr().out
    assert "euler" in out and "NFE 5" in out, out  # 4 steps + the final denoising step
    # any length: past the context (32) semi-autoregressively, the new windows filled from the uniform prior
    assert main(["sample", str(a / "model"), "--sampler", "tweedie", "-o", "steps=3", "--num-samples", "2",
                 "--length", "48"]) == 0
    assert "NFE 8" in capsys.readouterr().out  # two windows of 3 steps + the final denoising step each


def test_sedd_absorbing_through_the_python_api(micro_args, tmp_path):
    """A SEDD-absorbing model loads and samples with its default (tweedie), euler and MDLM's ancestral sampler."""
    import dlm
    from dlm.cli import main

    out = tmp_path / "absorb"
    assert main(["train", *micro_args(out, "process=sedd", "trainer.max_steps=4", "trainer.ckpt_every=4")]) == 0
    model = dlm.load(out / "model")
    assert model.process.name == "sedd" and model.process.corruption == "absorbing"
    assert model.process.default_sampler == "tweedie"
    for sampler in ("tweedie", "euler", "ancestral"):
        gen = model.generate(["And"], gen_length=8, steps=4, sampler=sampler, seed=0)
        assert gen.tokens.shape[1] >= 8 and not bool((gen.tokens == model.process.mask_id).any())
