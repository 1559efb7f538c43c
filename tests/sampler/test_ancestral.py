"""The ancestral sampler (plain and cached) and float64 categorical sampling (`sample_tokens`)."""

import pytest
import torch
from scipy.stats import chi2

from dlm.process import MaskedDiffusion
from dlm.process.mdlm import subs_logits
from dlm.process.schedules import LogLinearSchedule
from dlm.sampler import AncestralSampler, Canvas, sample_tokens
from dlm.sampler.registry import make_sampler
from tests.toy_canvas import sample

V, MASK, BOS, L = 12, 11, 0, 16


class Counting(torch.nn.Module):
    """Counts the network calls a sampler really makes."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *args, **kw):
        self.calls += 1
        return self.net(*args, **kw)


def canvas_and_fixed(B: int = 3):
    """BOS + a 3-token prompt, 8 masks, 2 fixed tokens (an infill span), 2 masks: (canvas, fixed), both (B, L)."""
    canvas = torch.full((B, L), MASK)
    canvas[:, 0] = BOS
    canvas[:, 1:4] = torch.tensor([5, 6, 7])
    canvas[:, 12:14] = torch.tensor([8, 9])
    return canvas, canvas != MASK


def process(time_conditioning: bool = False) -> MaskedDiffusion:
    return MaskedDiffusion(LogLinearSchedule(1e-3), MASK, sampling_eps=1e-3, time_conditioning=time_conditioning)


@pytest.mark.parametrize("steps", [3, 16, 64])
def test_cached_sampler_gives_identical_tokens_with_fewer_calls(tiny_network, steps):
    net = Counting(tiny_network(V))
    canvas, fixed = canvas_and_fixed()
    for seed in range(3):
        outs = {}
        for cache in (False, True):
            net.calls = 0
            sampler = AncestralSampler(steps, temperature=0.8, top_p=0.9, cache=cache)
            out = sample(sampler, net, process(), canvas, fixed, torch.Generator().manual_seed(seed))
            assert out.nfe == net.calls
            outs[cache] = out
        assert torch.equal(outs[False].tokens, outs[True].tokens)
        assert outs[True].nfe <= outs[False].nfe
        if steps == 64:  # 10 masks per row over 64 steps: most steps commit nothing and cost no call
            assert outs[True].nfe < outs[False].nfe // 2


@pytest.mark.parametrize("cache", [False, True])
def test_trajectory_only_unmasks_and_fixed_tokens_never_change(tiny_network, cache):
    net = tiny_network(V, seed=1)
    canvas, fixed = canvas_and_fixed()
    for seed in range(3):
        out = sample(AncestralSampler(12, temperature=1.3, top_p=0.95, cache=cache),
                     net, process(), canvas, fixed, torch.Generator().manual_seed(seed), record_trajectory=True)
        assert len(out.trajectory) in (12, 13)  # one canvas per step, plus the final argmax if masks remained
        prev = canvas
        for cur in out.trajectory:
            committed = prev != MASK
            assert torch.equal(cur[committed], prev[committed])  # committed tokens never change
            assert bool((prev[cur == MASK] == MASK).all())  # nothing is ever remasked
            assert torch.equal(cur[fixed], canvas[fixed])
            prev = cur
        assert torch.equal(out.trajectory[-1], out.tokens)
        assert not bool((out.tokens == MASK).any())
        assert torch.equal(out.tokens[fixed], canvas[fixed])


def test_canvas_from_fixed_fills_the_prior(tiny_network):
    """The positions to generate are explicit (Canvas.to_generate); with a process they are filled from its prior."""
    net = tiny_network(V, seed=2)
    canvas, fixed = canvas_and_fixed()
    noisy = torch.where(fixed, canvas, 3)  # whatever the positions to generate hold
    a = AncestralSampler(8).sample(net, process(), Canvas.from_fixed(noisy, fixed, process()),
                                   torch.Generator().manual_seed(0))
    b = sample(AncestralSampler(8), net, process(), canvas, fixed, torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens)


def test_temperature_zero_commits_the_argmax_of_the_current_canvas(tiny_network):
    """Greedy ancestral sampling: every committed token is the argmax of x_theta on the canvas before that step.
    (Which positions are committed when stays random, so different seeds may still give different texts.)"""
    net = tiny_network(V, seed=3)
    canvas, fixed = canvas_and_fixed()
    for seed in range(2):
        out = sample(AncestralSampler(6, temperature=0.0), net, process(), canvas, fixed,
                     torch.Generator().manual_seed(seed), record_trajectory=True)
        prev = canvas
        for cur in out.trajectory:
            new = (prev == MASK) & (cur != MASK)
            with torch.no_grad():
                greedy = subs_logits(net(prev), MASK).argmax(-1)
            assert torch.equal(cur[new], greedy[new])
            prev = cur
    again = sample(AncestralSampler(6, temperature=0.0), net, process(), canvas, fixed, torch.Generator().manual_seed(1))
    assert torch.equal(again.tokens, out.tokens)  # same seed, same result


def test_sampler_errors(tiny_network):
    for top_p in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="top_p"):
            AncestralSampler(8, top_p=top_p)
    with pytest.raises(ValueError, match="temperature"):
        AncestralSampler(8, temperature=-0.1)
    for steps in (0, -3):
        with pytest.raises(ValueError, match="steps"):
            AncestralSampler(steps)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("nope", steps=8)
    net = tiny_network(V, time_conditioning=True)
    canvas, fixed = canvas_and_fixed()
    with pytest.raises(ValueError, match="time conditioning"):
        sample(AncestralSampler(8, cache=True), net, process(time_conditioning=True), canvas, fixed)
    # Without the cache a time-conditioned model samples fine.
    out = sample(AncestralSampler(4), net, process(time_conditioning=True), canvas, fixed, torch.Generator().manual_seed(0))
    assert not bool((out.tokens == MASK).any())


# ------------------------------------------------------------------------------------------- sample_tokens
def draw(logits: torch.Tensor, n: int, seed: int, **kw) -> torch.Tensor:
    """n draws from each row of logits (R, V): counts (R, V)."""
    R, Vv = logits.shape
    u = torch.rand(n * R, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    tokens = sample_tokens(logits.repeat(n, 1), u, **kw).view(n, R)
    return torch.stack([torch.bincount(tokens[:, r], minlength=Vv) for r in range(R)])


def assert_frequencies_match(counts: torch.Tensor, probs: torch.Tensor):
    """Pearson chi-square over the tokens with positive probability, at a 1e-6 false-alarm level."""
    for c, p in zip(counts.double(), probs.double()):
        support = p > 0
        assert c[~support].sum() == 0
        if int(support.sum()) == 1:
            continue
        expected = c.sum() * p[support]
        stat = float(((c[support] - expected) ** 2 / expected).sum())
        assert stat < chi2.ppf(1 - 1e-6, int(support.sum()) - 1), stat


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_sample_tokens_frequencies_match_softmax(temperature):
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0, 0.5, -3.0], [3.0, 0.0, 0.0, 0.1, -0.5, 1.0]])
    counts = draw(logits, 100_000, seed=0, temperature=temperature)
    assert_frequencies_match(counts, torch.softmax(logits.double() / temperature, -1))


def test_sample_tokens_frequencies_detect_a_wrong_temperature():
    """Control for the test above: the same check rejects samples drawn at another temperature."""
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0, 0.5, -3.0]])
    counts = draw(logits, 100_000, seed=0, temperature=0.9)
    with pytest.raises(AssertionError):
        assert_frequencies_match(counts, torch.softmax(logits.double(), -1))


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([0.06, 0.25, 0.04, 0.40, 0.10, 0.15], dtype=torch.float64)  # sorted: 3, 1, 5, 4, 0, 2
    logits = probs.log().float()[None]
    for top_p, nucleus in ((0.3, [3]), (0.6, [3, 1]), (0.7, [3, 1, 5]), (0.85, [3, 1, 5, 4]), (0.95, [3, 1, 5, 4, 0]), (0.97, [3, 1, 5, 4, 0, 2])):
        counts = draw(logits, 40_000, seed=1, top_p=top_p)[0]
        kept = torch.zeros(6, dtype=torch.bool)
        kept[nucleus] = True
        assert bool((counts[kept] > 0).all()) and int(counts[~kept].sum()) == 0, (top_p, counts)
        want = torch.where(kept, probs, 0.0)
        assert_frequencies_match(counts[None], (want / want.sum())[None])


def test_zero_probability_tokens_are_never_drawn():
    logits = torch.tensor([[float("-inf"), 0.3, 1.0, float("-inf"), -0.2, float("-inf")]])
    edge = torch.tensor([0.0, 1e-300, 1e-12, 0.5, 1.0 - 1e-16, 1.0], dtype=torch.float64)  # extreme uniforms
    for temperature, top_p in ((1.0, 1.0), (0.5, 0.8), (3.0, 1.0)):
        tokens = sample_tokens(logits.expand(len(edge), -1), edge, temperature, top_p)
        assert not bool(torch.isin(tokens, torch.tensor([0, 3, 5])).any()), tokens
        counts = draw(logits, 20_000, seed=2, temperature=temperature, top_p=top_p)
        assert int(counts[0, [0, 3, 5]].sum()) == 0


def test_temperature_zero_and_tiny_top_p_are_argmax():
    logits = torch.randn(50, 9, generator=torch.Generator().manual_seed(0))
    u = torch.rand(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(sample_tokens(logits, u, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample_tokens(logits, u, top_p=1e-9), logits.argmax(-1))
