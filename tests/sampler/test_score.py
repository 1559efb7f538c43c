"""The score samplers (dlm/sampler/score.py): their update rules against first principles (matrix exponentials of
the rate matrix; MDLM's ancestral step), and their output distribution with an oracle network on a tiny data
distribution: the score samplers on an MDLM and on SEDD (both graphs), MDLM's ancestral sampler on a SEDD-absorbing
model, prompts included."""

import itertools
import math

import pytest
import torch

from dlm.process import MaskedDiffusion
from dlm.process.schedules import LogLinearSchedule
from dlm.process.score_graphs import GeometricNoise, LogLinearNoise, euler_probs, tweedie_probs
from dlm.process.sedd import SEDD
from dlm.sampler import Canvas
from dlm.sampler.registry import make_sampler
from tests.process.test_sedd import rate_matrix
from tests.sampler.test_padding import models, one_thread  # noqa: F401 (fixtures)

V, MASK = 6, 5


# ------------------------------------------------------------------------------------------ update rules
def random_scores(graph, n, g):
    x = torch.full((n,), MASK) if graph == "absorbing" else torch.randint(0, V, (n,), generator=g)
    log_s = (0.5 * torch.randn(n, V, generator=g)).scatter(-1, x[:, None], 0.0)
    return log_s, x


@pytest.mark.parametrize("graph", ["absorbing", "uniform"])
def test_tweedie_step_is_the_staggered_score_times_the_transposed_transition(graph):
    """probs_y = (expm(-Δσ R)^T s)_y · expm(Δσ R)[y, x] (SEDD's analytic step, R the forward rate matrix)."""
    g = torch.Generator().manual_seed(0)
    log_s, x = random_scores(graph, 8, g)
    dsigma = torch.full((8,), 0.05)  # small enough that no entry is clamped
    R = rate_matrix(graph, V, MASK)
    back, fwd = torch.linalg.matrix_exp(-0.05 * R), torch.linalg.matrix_exp(0.05 * R)
    s = log_s.double().exp()
    want = torch.stack([(back.T @ s[i]) * fwd[:, int(x[i])] for i in range(8)])
    got = tweedie_probs(graph, log_s, x, dsigma, MASK)
    assert torch.allclose(got.double(), want, atol=1e-6)


@pytest.mark.parametrize("graph", ["absorbing", "uniform"])
def test_euler_step_is_one_hot_plus_the_reverse_rates(graph):
    """probs = one-hot(x) + Δt σ' (R[y, x] s_y for y ≠ x, minus their sum at x)."""
    g = torch.Generator().manual_seed(1)
    log_s, x = random_scores(graph, 8, g)
    step = torch.full((8,), 0.02)
    R = rate_matrix(graph, V, MASK)
    s = log_s.double().exp()
    want = torch.zeros(8, V, dtype=torch.float64)
    for i in range(8):
        xi = int(x[i])
        for y in range(V):
            if y != xi:
                want[i, y] = 0.02 * R[y, xi] * s[i, y]
        want[i, xi] = 1.0 - want[i].sum()
    assert torch.allclose(euler_probs(graph, log_s, x, step, MASK).double(), want, atol=1e-6)


def test_tweedie_on_radd_scores_is_mdlms_ancestral_step():
    """With an MDLM's scores (RADD), the analytic step t -> s at a mask reveals v with probability
    (alpha_s - alpha_t)/(1 - alpha_t) x_theta(v) and stays masked with (1 - alpha_s)/(1 - alpha_t)."""
    mdlm = MaskedDiffusion(LogLinearSchedule(1e-3), MASK)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, V, generator=g)
    z = torch.full((3, 4), MASK)
    t, s = torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0.8, 0.45, 0.02])
    log_s = mdlm.log_score(logits, z, t)
    dsigma = (mdlm.total_noise(t) - mdlm.total_noise(s)).float()[:, None].expand(3, 4)
    got = tweedie_probs("absorbing", log_s.flatten(0, 1), z.flatten(), dsigma.flatten(), MASK).view(3, 4, V)
    a_t, a_s = mdlm.alpha(t.double())[:, None, None], mdlm.alpha(s.double())[:, None, None]
    x_theta = mdlm.denoise(logits).softmax(-1).double()
    want = (a_s - a_t) / (1 - a_t) * x_theta
    want[..., MASK] = ((1 - a_s) / (1 - a_t))[..., 0]
    assert torch.allclose(got.double(), want, atol=1e-5)


# ------------------------------------------------------------------------------------------ oracle networks
TOK, L = 3, 3  # three clean tokens (ids 0..2), sequences of three


def data_distribution() -> torch.Tensor:
    """p (TOK,)*L float64: a fixed, strongly correlated distribution over the 27 sequences."""
    g = torch.Generator().manual_seed(5)
    p = torch.rand((TOK,) * L, generator=g, dtype=torch.float64) ** 4
    return p / p.sum()


class MaskedOracle(torch.nn.Module):
    """The exact x0-posterior of `data_distribution` as logits: log p(x^l = v | the unmasked positions of z) at
    every position (mask id `mask_id` in a vocabulary of `vocab` ids), plus `offset` (a constant per position, which
    SEDD-absorbing's scale_by_sigma reads as log(N - 1)). A table over the (TOK + 1)^L canvases, looked up."""

    def __init__(self, p, mask_id, vocab, offset=0.0):
        super().__init__()
        self.mask_id, self.vocab, self.calls = mask_id, vocab, 0
        seqs = torch.tensor(list(itertools.product(range(TOK), repeat=L)))  # (27, L)
        canvases = torch.tensor(list(itertools.product(range(TOK + 1), repeat=L)))  # (64, L), TOK stands for [MASK]
        self.table = torch.full((len(canvases), L, vocab), -1e4)
        for c, z in enumerate(canvases):
            keep = ((z == TOK) | (seqs == z)).all(1)  # sequences consistent with the canvas's clean tokens
            w = p.flatten() * keep
            for pos in range(L):
                marg = torch.zeros(TOK, dtype=torch.float64).index_add_(0, seqs[:, pos], w)
                self.table[c, pos, :TOK] = (marg.clamp_min(1e-300).log() - w.sum().log() + offset).float()

    def forward(self, z, inputs_embeds=None, t=None, **kw):
        self.calls += 1
        digits = torch.where(z == self.mask_id, TOK, z)
        code = (digits * torch.tensor([(TOK + 1) ** (L - 1 - i) for i in range(L)])).sum(1)
        return self.table[code]


class UniformOracle(torch.nn.Module):
    """The exact log-ratios of the uniform graph's noisy marginals p_t(z) = sum_x p(x) prod_l P_σ̄(x^l -> z^l):
    out[b, l, y] = log p_t(z_b with position l set to y) - log p_t(z_b), σ̄ from the time it is fed."""

    def __init__(self, p, noise):
        super().__init__()
        self.p, self.noise = p, noise

    def forward(self, z, inputs_embeds=None, t=None, **kw):
        sigma = self.noise.total(t.double())  # (B,)
        a = torch.exp(-sigma)[:, None, None]
        P = a * torch.eye(TOK, dtype=torch.float64) + (1 - a) / TOK  # (B, TOK, TOK): P[x, z]
        pt = torch.einsum("ijk,bia,bjc,bkd->bacd", self.p, P, P, P).flatten(1).log()  # (B, 27)
        place = torch.tensor([TOK ** (L - 1 - i) for i in range(L)])  # (L,)
        code = (z * place).sum(1)  # (B,)
        ys = torch.arange(TOK)
        moved = code[:, None, None] + (ys[None, None, :] - z[:, :, None]) * place[None, :, None]  # (B, L, TOK)
        return (pt.gather(1, moved.flatten(1)).view_as(moved.double()) - pt.gather(1, code[:, None])[:, :, None]).float()


def sample_distribution(sampler, net, process, n, fixed=None, seed=0) -> torch.Tensor:
    """The empirical distribution (TOK,)*L of n sampled sequences (fixed: {position: token} given)."""
    tokens = torch.zeros(n, L, dtype=torch.long)
    given = torch.zeros(n, L, dtype=torch.bool)
    for pos, tok in (fixed or {}).items():
        tokens[:, pos], given[:, pos] = tok, True
    canvas = Canvas.from_fixed(tokens, given, process, torch.Generator().manual_seed(seed))
    out = sampler.sample(net, process, canvas, torch.Generator().manual_seed(seed)).tokens
    assert bool((out < TOK).all()), "a sequence kept noise or a non-token"
    counts = torch.zeros(TOK ** L, dtype=torch.float64)
    counts.index_add_(0, (out * torch.tensor([TOK ** 2, TOK, 1])).sum(1), torch.ones(n, dtype=torch.float64))
    return (counts / n).view((TOK,) * L)


def tv(a, b) -> float:
    return 0.5 * float((a - b).abs().sum())


def conditional(p, fixed):
    q = p.clone()
    for pos, tok in fixed.items():
        keep = torch.zeros(TOK, dtype=torch.bool)
        keep[tok] = True
        shape = [1] * L
        shape[pos] = TOK
        q = q * keep.view(shape)
    return q / q.sum()


N_SAMPLES = 4000
# Tolerance. Drawing N = 4000 sequences exactly from p, E[TV] ≈ sum_k sqrt(p_k(1-p_k)/N) sqrt(2/π) / 2 ≈ 0.03 here
# (measured over 5 seeds: 0.015 to 0.035, `exact_tv`); a sampler's own error adds: with 200 steps the chance that
# two of three positions are revealed in the same step (drawn independently) is ~3 · 200 · (1/200)^2 ≈ 1.5 %. So
# 0.07 is above what a correct sampler reaches (measured: 0.009 to 0.029 for every case below) and far below what a
# wrong one gives (the negative control, an oracle of another distribution: TV 0.36 to 0.58).
TOL = 0.07


def exact_tv(p, n=N_SAMPLES, seed=0) -> float:
    draws = torch.multinomial(p.flatten().float(), n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return tv(torch.bincount(draws, minlength=TOK ** L).double().view_as(p) / n, p)


def test_the_tolerance_is_above_exact_sampling_noise():
    p = data_distribution()
    noise = [exact_tv(p, seed=s) for s in range(5)]
    assert max(noise) < TOL / 1.5, noise


@pytest.mark.parametrize("name", ["euler", "tweedie"])
@pytest.mark.parametrize("fixed", [None, {0: 2}], ids=["unconditional", "prompt"])
def test_score_samplers_on_an_mdlm_draw_the_data_distribution(name, fixed):
    p = data_distribution()
    mdlm = MaskedDiffusion(LogLinearSchedule(1e-3), TOK)
    oracle = MaskedOracle(p, TOK, TOK + 1)
    got = sample_distribution(make_sampler(name, steps=200), oracle, mdlm, N_SAMPLES, fixed)
    want = p if fixed is None else conditional(p, fixed)
    assert tv(got, want) < TOL
    wrong = MaskedOracle(data_distribution().flip(0, 1), TOK, TOK + 1)  # negative control: another distribution
    bad = sample_distribution(make_sampler(name, steps=200), wrong, mdlm, N_SAMPLES, fixed)
    assert tv(bad, want) > 2 * TOL


@pytest.mark.parametrize("name", ["ancestral", "euler", "tweedie"])
def test_a_sedd_absorbing_model_samples_with_mdlm_and_score_samplers(name):
    """SEDD-absorbing's output is read as scores (scale_by_sigma: out - log(e^σ̄ - 1) - log(N - 1)) by the score
    samplers and as x0 logits (`denoise`) by MDLM's ancestral sampler: both draw the data distribution."""
    p = data_distribution()
    sedd = SEDD("absorbing", LogLinearNoise(1e-3), TOK)
    oracle = MaskedOracle(p, TOK, TOK + 1, offset=math.log(TOK))  # N - 1 = TOK tokens besides [MASK]
    got = sample_distribution(make_sampler(name, steps=200), oracle, sedd, N_SAMPLES)
    assert tv(got, p) < TOL


@pytest.mark.parametrize("name", ["euler", "tweedie"])
@pytest.mark.parametrize("fixed", [None, {1: 0}], ids=["unconditional", "infill"])
def test_score_samplers_on_a_sedd_uniform_model_draw_the_data_distribution(name, fixed):
    """The uniform graph with geometric noise: the canvas starts from uniform tokens (the prior), the oracle gives
    the exact ratios of the noisy marginals at each step's time."""
    p = data_distribution()
    noise = GeometricNoise(1e-4, 20.0)
    sedd = SEDD("uniform", noise, None, time_conditioning=True)
    from dlm.process.base import ModelDescription

    sedd.description = ModelDescription(vocab_size=TOK, time_conditioning=True)
    want = p if fixed is None else conditional(p, fixed)
    # with a given position, the oracle of p(· | it): its noisy-marginal factor at the given position is common to
    # every ratio of the other positions and cancels, so these are the exact conditional scores
    got = sample_distribution(make_sampler(name, steps=200), UniformOracle(want, noise), sedd, N_SAMPLES, fixed)
    assert tv(got, want) < TOL


def test_nfe_and_early_stop_on_an_absorbing_canvas():
    p = data_distribution()
    mdlm = MaskedDiffusion(LogLinearSchedule(1e-3), TOK)
    oracle = MaskedOracle(p, TOK, TOK + 1)
    canvas = Canvas.from_fixed(torch.zeros(2, L, dtype=torch.long), torch.zeros(2, L, dtype=torch.bool), mdlm)
    out = make_sampler("tweedie", steps=4).sample(oracle, mdlm, canvas, torch.Generator().manual_seed(0))
    assert out.nfe == oracle.calls <= 5 and not bool((out.tokens == TOK).any())
    full = Canvas.from_fixed(torch.ones(2, L, dtype=torch.long), torch.ones(2, L, dtype=torch.bool), mdlm)
    out = make_sampler("euler", steps=4).sample(oracle, mdlm, full, torch.Generator().manual_seed(0))
    assert out.nfe == 0 and torch.equal(out.tokens, torch.ones(2, L, dtype=torch.long))  # nothing to generate


def test_a_process_without_scores_is_refused_with_the_reason(tiny_network):
    from dlm.process import Autoregressive
    from dlm.process.base import Process

    class NoScores(Process):
        name = "no_scores_test"

    net = tiny_network(V)
    calls = []
    hook = net.register_forward_hook(lambda *a: calls.append(1))
    canvas = Canvas.from_fixed(torch.full((1, 4), MASK), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="process 'no_scores_test' has no score parameterisation"):
        make_sampler("euler", steps=2).sample(net, NoScores(mask_id=MASK), canvas)
    assert not calls  # refused before any network call
    hook.remove()
    with pytest.raises(ValueError, match="needs an autoregressive model|autoregressive model samples"):
        make_sampler("euler", steps=2).sample(net, Autoregressive(), canvas)


def test_an_mdlm_checkpoint_samples_with_the_score_samplers(micro_run, capsys):
    """`dlm sample MDLM_RUN --sampler tweedie / euler`: an MDLM trained by dlm, its scores from RADD."""
    from dlm.cli import main

    for name in ("tweedie", "euler"):
        capsys.readouterr()
        assert main(["sample", str(micro_run / "model"), "--sampler", name, "-o", "steps=6", "--num-samples", "2",
                     "--length", "16"]) == 0
        out = capsys.readouterr().out
        assert f"{name}, 6 steps" in out and "[MASK]" not in out, out


@pytest.mark.parametrize("name", ["euler", "tweedie"])
def test_the_cache_gives_the_same_tokens_with_fewer_calls(name, tiny_network):
    """cache=true (no time conditioning): a row whose canvas did not change reuses its logits; the draws do not
    depend on it, so the tokens are those of cache=false, with fewer network calls (64 steps for 12 masks)."""
    from tests.toy_canvas import MASK as TMASK, V as TV, canvas_and_fixed

    net = tiny_network(TV, seed=3)
    mdlm = MaskedDiffusion(LogLinearSchedule(1e-3), TMASK)
    canvas = Canvas.from_fixed(*canvas_and_fixed(3))
    plain = make_sampler(name, steps=64).sample(net, mdlm, canvas, [torch.Generator().manual_seed(r) for r in range(3)])
    cached = make_sampler(name, steps=64, cache=True).sample(net, mdlm, canvas,
                                                             [torch.Generator().manual_seed(r) for r in range(3)])
    assert torch.equal(plain.tokens, cached.tokens)
    assert cached.nfe < plain.nfe and bool((cached.nfe_per_row <= 13).all())  # at most one call per change + 1
    with pytest.raises(ValueError, match="cache=true needs a model without time conditioning"):
        make_sampler(name, steps=4, cache=True).sample(tiny_network(TV, time_conditioning=True),
                                                        MaskedDiffusion(LogLinearSchedule(1e-3), TMASK, time_conditioning=True),
                                                        canvas)


def test_cached_rows_joining_and_leaving_get_their_tokens_alone(models):
    """The step-level API with cache=true: rows join a running batch (their cached logits padded and stacked)
    and leave it, each getting exactly its tokens alone (tests/sampler/test_step_api.py's check)."""
    from tests.sampler.test_step_api import GEN, PROMPTS, run_joining_and_leaving

    model = models["mdlm"]
    sampler = make_sampler("tweedie", steps=24, cache=True)
    net, process = model.network, model.process
    prompts = [[model.tokenizer.bos_token_id] + model.encode(p) for p in PROMPTS]

    def canvas(i):
        return Canvas.left_padded([prompts[i]], GEN, process)

    def gen(i):
        return [torch.Generator().manual_seed(300 + i)]

    with torch.no_grad():
        alone = [sampler.sample(net, process, canvas(i), gen(i)).tokens[0, -GEN:] for i in range(4)]
        got = run_joining_and_leaving(sampler, net, process, canvas, gen, (0, 1), {2: 2, 4: 3}, GEN)
    for i in range(4):
        assert torch.equal(got[i], alone[i]), i
