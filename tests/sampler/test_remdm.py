"""ReMDM remasking samplers: fixed tokens are never remasked, no mask survives, the remasking steps keep the
mask marginal of the schedule, sigma follows each strategy, composition with soft-masking and top-p, bad input."""

import pytest
import torch

from dlm.sampler import ReMDMSampler
from dlm.sampler.registry import make_sampler
from dlm.softmask import SoftMaskFeedback, SoftMaskMixer

from tests.toy_canvas import BOS, MASK, V, L, canvas_and_fixed, process, sample

STRATEGIES = ["cap", "rescale", "conf", "loop"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fixed_tokens_are_never_remasked_and_no_mask_is_left(tiny_network, strategy):
    net = tiny_network(V, seed=3)
    canvas, fixed = canvas_and_fixed()
    eta = None if strategy == "conf" else 0.3  # strong remasking, so decoded tokens really are remasked
    remasked = 0
    for seed in range(3):
        out = sample(ReMDMSampler(12, strategy=strategy, eta=eta, top_p=0.9), net, process(), canvas, fixed,
                     torch.Generator().manual_seed(seed), record_trajectory=True)
        previous = canvas
        for z in out.trajectory:
            assert torch.equal(z[fixed], canvas[fixed])
            remasked += int(((previous != MASK) & (z == MASK)).sum())
            previous = z
        assert not bool((out.tokens == MASK).any()) and torch.equal(out.tokens[fixed], canvas[fixed])
        assert out.nfe in (12, 13)
    assert remasked > 0  # the property above is not vacuous


def test_loop_holds_the_mask_fraction_at_one_minus_alpha_on(tiny_network):
    """During the loop alpha is constant; remasking (sigma per decoded token) and unmasking (sigma alpha/(1-alpha)
    per mask) balance, so the fraction of masks stays at 1 - alpha_on = 0.1 in expectation."""
    net = tiny_network(V, seed=4)
    B, n = 64, L - 1
    canvas = torch.full((B, L), MASK)
    canvas[:, 0] = BOS
    sampler = ReMDMSampler(20, strategy="loop", eta=0.2)
    times, remask = sampler.time_grid(process())
    out = sample(sampler, net, process(), canvas, canvas != MASK, torch.Generator().manual_seed(0),
                 record_trajectory=True)
    loop_steps = remask.nonzero().squeeze(-1).tolist()
    fractions = [float((out.trajectory[i] == MASK).sum()) / (B * n) for i in [loop_steps[0] - 1] + loop_steps]
    # binomial std of one fraction: sqrt(0.1 * 0.9 / 960) ~ 0.01
    assert abs(sum(fractions) / len(fractions) - 0.1) < 0.03
    assert all(abs(f - 0.1) < 0.05 for f in fractions)


def test_loop_time_grid():
    sampler = ReMDMSampler(40, strategy="loop")
    times, remask = sampler.time_grid(process())
    alphas = process().schedule.alpha(times)
    assert times.shape == (41,) and remask.shape == (40,)
    assert float(times[0]) == 1.0 and float(times[-1]) == pytest.approx(1e-3)
    assert bool((times[1:] <= times[:-1]).all())
    loop = remask.nonzero().squeeze(-1)
    assert int(remask.sum()) == 20  # (t_on - t_off) * steps
    assert torch.allclose(alphas[loop], torch.full((20,), 0.9, dtype=torch.float64))
    assert torch.allclose(alphas[loop + 1], torch.full((20,), 0.9, dtype=torch.float64))


@pytest.mark.parametrize("steps,t_on,t_off", [(3, 0.55, 0.05), (3, 0.1, 0.05), (10, 0.1, 0.05), (10, 0.95, 0.9),
                                               (7, 0.99, 0.01)])
def test_loop_time_grid_has_every_phase_for_any_valid_arguments(steps, t_on, t_off):
    """MDLM down to alpha_on, at least one remasking step at constant alpha, then MDLM down to sampling_eps."""
    times, remask = ReMDMSampler(steps, strategy="loop", t_on=t_on, t_off=t_off).time_grid(process())
    alphas = process().schedule.alpha(times)
    assert times.shape == (steps + 1,) and remask.shape == (steps,)
    assert float(times[0]) == 1.0 and float(times[-1]) == pytest.approx(1e-3)  # phase 3 reaches eps
    assert bool((times[1:] <= times[:-1]).all()) and 1 <= int(remask.sum()) <= steps - 2
    loop = remask.nonzero().squeeze(-1)
    assert int(loop[0]) >= 1 and int(loop[-1]) <= steps - 2 and bool((loop.diff() == 1).all())  # one run, inside
    assert torch.allclose(alphas[loop], torch.full((len(loop),), 0.9, dtype=torch.float64))


def test_sigma_of_each_strategy():
    decoded = torch.tensor([[True, True, False, True]])
    confidence = torch.tensor([[0.9, 0.2, 1.0, 0.5]])
    a_t, a_s = 0.5, 0.6  # sigma_max = min(1, 0.4 / 0.5) = 0.8
    assert float(ReMDMSampler(4, strategy="cap", eta=0.05).sigma(a_t, a_s, decoded, confidence)) == pytest.approx(0.05)
    assert float(ReMDMSampler(4, strategy="cap", eta=0.95).sigma(a_t, a_s, decoded, confidence)) == pytest.approx(0.8)
    assert float(ReMDMSampler(4, strategy="rescale", eta=0.5).sigma(a_t, a_s, decoded, confidence)) == pytest.approx(0.4)
    conf = ReMDMSampler(4, strategy="conf").sigma(a_t, a_s, decoded, confidence)
    assert float(conf.sum()) == pytest.approx(0.8) and float(conf[0, 2]) == 0.0
    assert float(conf[0, 1]) > float(conf[0, 3]) > float(conf[0, 0])  # least confident first
    assert float(ReMDMSampler(4, strategy="cap").sigma(0.001, 0.002, decoded, confidence)) == pytest.approx(0.008)


@pytest.mark.parametrize("name", ["remdm_cap", "remdm_rescale", "remdm_conf", "remdm_loop"])
def test_composes_with_soft_masking_and_top_p(tiny_network, name):
    net = tiny_network(V, seed=5)
    canvas, fixed = canvas_and_fixed()

    def run(omega_s):
        fb = SoftMaskFeedback(SoftMaskMixer(k=3), MASK, omega_s=omega_s, omega_a=2.0, omega_b=-3.0)
        return sample(make_sampler(name, steps=10, top_p=0.8, feedback=fb), net, process(), canvas, fixed,
                      torch.Generator().manual_seed(1))

    plain = sample(make_sampler(name, steps=10, top_p=0.8), net, process(), canvas, fixed, torch.Generator().manual_seed(1))
    assert torch.equal(run(0.0).tokens, plain.tokens)  # w_s = 0: exactly the sampler without SM
    out = run(0.9)
    assert not bool((out.tokens == MASK).any()) and torch.equal(out.tokens[fixed], canvas[fixed])


def test_published_defaults_and_bad_parameters():
    assert make_sampler("remdm_cap", steps=8).eta == 0.008
    assert make_sampler("remdm_rescale", steps=8).eta == 0.015
    loop = make_sampler("remdm_loop", steps=8)
    assert (loop.eta, loop.t_on, loop.t_off, loop.alpha_on) == (0.02, 0.55, 0.05, 0.9)
    for kw, match in [(dict(eta=-0.1), "eta"), (dict(eta=1.5), "eta"),
                      (dict(strategy="loop", t_on=0.1, t_off=0.2), "t_off"), (dict(strategy="loop", t_on=1.2), "t_on"), (dict(strategy="loop", alpha_on=1.0), "alpha_on"),
                      (dict(strategy="loop", steps=2), "steps"), (dict(strategy="conf", eta=0.1), "eta"),
                      (dict(strategy="max"), "strategy"), (dict(steps=0), "steps"), (dict(top_p=0.0), "top_p")]:
        kw = {"steps": 8, **kw}
        with pytest.raises(ValueError, match=match):
            ReMDMSampler(**kw)
    with pytest.raises(ValueError, match="alpha_on"):  # alpha never reaches 0.9995 before sampling_eps = 1e-3
        ReMDMSampler(8, strategy="loop", alpha_on=0.9995).time_grid(process())
