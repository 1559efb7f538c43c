"""Soft-masking at sampling time: exactness at w_s = 0, committed and fixed tokens, the cached sampler, the final
step, schedules, overrides and training-free use."""

import pytest
import torch

from dlm.process import MaskedDiffusion
from dlm.process.schedules import LogLinearSchedule
from dlm.sampler import AncestralSampler, Canvas, semi_autoregressive
from dlm.sampler.registry import make_sampler
from dlm.softmask import SoftMaskFeedback, SoftMaskMixer, build_feedback, schedule_scale

from tests.toy_canvas import BOS, MASK, V, canvas_and_fixed, process, sample


class Recording(torch.nn.Module):
    """Counts network calls and records whether each one was given input embeddings."""

    def __init__(self, net):
        super().__init__()
        self.net, self.embed, self.got_embeds = net, net.embed, []

    def forward(self, *args, inputs_embeds=None, **kw):
        self.got_embeds.append(inputs_embeds is not None)
        return self.net(*args, inputs_embeds=inputs_embeds, **kw)


def feedback(omega_s, schedule="none"):
    return SoftMaskFeedback(SoftMaskMixer(k=3), MASK, schedule, omega_s=omega_s, omega_a=2.0, omega_b=-3.0)


@pytest.mark.parametrize("cache", [False, True])
def test_omega_s_zero_gives_exactly_the_plain_ancestral_tokens(tiny_network, cache):
    net = tiny_network(V)
    canvas, fixed = canvas_and_fixed()
    differs = False
    for seed in range(4):
        plain = sample(AncestralSampler(12, top_p=0.9, cache=cache), net, process(), canvas, fixed,
                       torch.Generator().manual_seed(seed))
        zero = sample(AncestralSampler(12, top_p=0.9, cache=cache, feedback=feedback(0.0)),
                      net, process(), canvas, fixed, torch.Generator().manual_seed(seed))
        strong = sample(AncestralSampler(12, top_p=0.9, cache=cache, feedback=feedback(0.95)),
                        net, process(), canvas, fixed, torch.Generator().manual_seed(seed))
        assert torch.equal(plain.tokens, zero.tokens)
        differs |= not torch.equal(plain.tokens, strong.tokens)
    assert differs  # the feedback really reaches the network


@pytest.mark.parametrize("cache", [False, True])
def test_sm_never_changes_committed_or_fixed_tokens(tiny_network, cache):
    net = tiny_network(V, seed=1)
    canvas, fixed = canvas_and_fixed()
    for seed in range(3):
        out = sample(AncestralSampler(10, cache=cache, feedback=feedback(0.9)),
                     net, process(), canvas, fixed, torch.Generator().manual_seed(seed), record_trajectory=True)
        previous = canvas
        for z in out.trajectory:
            committed = previous != MASK
            assert torch.equal(z[committed], previous[committed])
            previous = z
        assert torch.equal(out.tokens[fixed], canvas[fixed]) and not bool((out.tokens == MASK).any())


def test_cached_sampler_with_sm_calls_the_network_every_step_including_the_final_one(tiny_network):
    steps = 48  # 10 masks over 48 steps: most steps commit nothing
    canvas, fixed = canvas_and_fixed(B=1)
    # sampling_eps = 0.2 ends at alpha = 0.8, so masks are left for the final argmax call
    proc = MaskedDiffusion(LogLinearSchedule(1e-3), MASK, sampling_eps=0.2)
    plain = Recording(tiny_network(V))
    out_plain = sample(AncestralSampler(steps, cache=True), plain, proc, canvas, fixed, torch.Generator().manual_seed(0))
    assert out_plain.nfe < steps // 2  # without SM the cache skips most steps
    sm = Recording(tiny_network(V))
    out = sample(AncestralSampler(steps, cache=True, feedback=feedback(0.5)),
                 sm, proc, canvas, fixed, torch.Generator().manual_seed(0), record_trajectory=True)
    uncached = sample(AncestralSampler(steps, cache=False, feedback=feedback(0.5)),
                      tiny_network(V), proc, canvas, fixed, torch.Generator().manual_seed(0))
    assert out.nfe == len(sm.got_embeds) == uncached.nfe == steps + 1
    assert torch.equal(out.tokens, uncached.tokens)
    # every call after the first sees soft inputs while masks remain, the final argmax call included
    masks_before_call = [bool((z == MASK).any()) for z in out.trajectory[:steps]]  # canvas before calls 1..steps
    assert masks_before_call[-1] and sm.got_embeds == [False] + masks_before_call


def test_semi_autoregressive_with_sm_keeps_every_prefix(tiny_network):
    net = tiny_network(V, seed=2)
    canvas = torch.full((2, 12), MASK)
    canvas[:, :3] = torch.tensor([BOS, 4, 5])
    out = semi_autoregressive(AncestralSampler(6, feedback=feedback(0.8)), net, process(),
                              Canvas.from_fixed(canvas, canvas != MASK), 30, 5, torch.Generator().manual_seed(0))
    assert out.tokens.shape == (2, 30) and torch.equal(out.tokens[:, :3], canvas[:, :3])
    assert not bool((out.tokens == MASK).any())


def test_schedules_scale_omega_s():
    assert schedule_scale("none", 0.2) == 1.0
    assert schedule_scale("linear", 0.25) == 0.25
    assert schedule_scale("stepwise", 0.6) == 1.0 and schedule_scale("stepwise", 0.4) == 0.0
    with pytest.raises(ValueError, match="schedule"):
        schedule_scale("cosine", 0.5)
    z = torch.full((1, 4), MASK)
    z[0, 0] = BOS
    logits = torch.randn(1, 4, V)

    class Net:
        embed = torch.nn.Embedding(V, 8)

    fixed = z != MASK
    assert feedback(0.9, "stepwise")(Net, z, logits, fixed, 0.4) is None  # switched off: plain [MASK] ids
    linear = feedback(0.9, "linear")(Net, z, logits, fixed, 0.5)
    half = feedback(0.45)(Net, z, logits, fixed, 0.5)
    assert torch.equal(linear, half)  # linear at half the masks left = w_s / 2


def test_schedules_are_per_row():
    """masks_left (B,): each row is scaled by its own fraction, exactly as when it is sampled alone."""
    assert torch.equal(schedule_scale("stepwise", torch.tensor([0.6, 0.4])), torch.tensor([1.0, 0.0]))
    assert torch.equal(schedule_scale("none", torch.tensor([0.3, 0.1])), torch.ones(2))
    z = torch.full((3, 5), MASK)
    z[:, 0] = BOS
    z[1, 1:4] = 4  # row 1: one of four generated positions left
    logits = torch.randn(3, 5, V, generator=torch.Generator().manual_seed(0))

    class Net:
        embed = torch.nn.Embedding(V, 8)

    fixed = z == BOS
    left = torch.tensor([1.0, 0.25, 0.6])
    for schedule in ["linear", "stepwise"]:
        fb = feedback(0.9, schedule)
        rows = fb(Net, z, logits, fixed, left)
        for i in range(3):
            alone = fb(Net, z[i:i + 1], logits[i:i + 1], fixed[i:i + 1], float(left[i]))
            expected = Net.embed(z[i:i + 1]) if alone is None else alone  # None = plain [MASK] ids
            torch.testing.assert_close(rows[i:i + 1], expected, rtol=0, atol=1e-6)
    assert feedback(0.9, "stepwise")(Net, z, logits, fixed, torch.tensor([0.4, 0.2, 0.1])) is None  # all rows off


@pytest.mark.parametrize("name", ["ancestral", "remdm_loop", "first_hitting"])
def test_samplers_give_each_row_its_own_fraction_of_masks_left(tiny_network, name):
    """The feedback gets (B,) fractions of each row's generated positions, 1 before the first commit (not 1 / B)."""
    from dlm.sampler.base import InputFeedback

    seen = []

    class Spy(InputFeedback):
        def __call__(self, network, z, logits, fixed, masks_left):
            open_ = (z == MASK) & ~fixed
            seen.append(masks_left.clone())
            assert torch.equal(masks_left, open_.sum(1) / (~fixed).sum(1))
            return None

    canvas, fixed = canvas_and_fixed()
    steps = {} if name == "first_hitting" else {"steps": 8}  # first-hitting has no step budget
    sample(make_sampler(name, **steps, feedback=Spy()), tiny_network(V, seed=0), process(), canvas, fixed,
           torch.Generator().manual_seed(0))
    assert seen and seen[0].shape == (canvas.shape[0],) and canvas.shape[0] > 1
    assert (seen[0] > 0.5).all()  # a batch-wide count divided by B rows would be at most 1 / B


def test_overrides_and_training_free_use():
    trained = SoftMaskMixer(k=3, omega_s=0.3, omega_a=5.0, omega_b=-1.0)
    fb = build_feedback(trained, MASK)
    assert fb.omegas() == trained.omegas()
    fb = build_feedback(trained, MASK, omega_s=0.7, omega_b=-2.0, k=2)
    w = fb.omegas()
    assert w["omega_s"] == 0.7 and w["omega_b"] == -2.0 and w["omega_a"] == pytest.approx(5.0)
    assert fb.mixer.k == 2 and trained.k == 3
    with pytest.raises(ValueError, match="trained without soft-masking"):
        build_feedback(None, MASK)
    assert build_feedback(None, MASK, omega_s=0.5).omegas()["omega_s"] == 0.5
    with pytest.raises(ValueError, match="omega_s"):
        build_feedback(trained, MASK, omega_s=1.5)
    with pytest.raises(ValueError, match="autoregressive"):
        make_sampler("autoregressive", feedback=fb)


def test_pipeline_softmask_on_a_model_trained_without_it(micro_run):
    import dlm

    model = dlm.load(micro_run)
    with pytest.raises(ValueError, match="trained without soft-masking"):
        model.generate(num_samples=2, length=16, steps=4, softmask=True)
    plain = model.generate(num_samples=2, length=16, steps=6, seed=3)
    zero = model.generate(num_samples=2, length=16, steps=6, seed=3, softmask=dict(omega_s=0.0))
    assert torch.equal(plain.tokens, zero.tokens)
    for sampler in ("ancestral_cache", "remdm_rescale"):
        gen = model.generate(num_samples=2, length=16, steps=6, seed=3, sampler=sampler,
                             softmask=dict(omega_s=0.6, schedule="linear"))
        assert gen.nfe >= 6 and not bool((gen.tokens == model.tokenizer.mask_token_id).any())
