"""dlm's renoising sampler against transformers' own DiffusionGemma generation code (no download, no model weights):
both are fed the same logits, and the temperature, the acceptance set, the renoising mask and the stopping decision
are compared step by step; then transformers' denoising step function drives a whole loop on a toy network with
the random draws dlm's sampler made, and the two canvases, argmax canvases and stopping steps agree. What is
compared is spelled out in docs/renoise.md."""

from types import SimpleNamespace
from unittest import mock

import pytest
import torch

gd = pytest.importorskip("transformers.models.diffusion_gemma.generation_diffusion_gemma")

from dlm.process import ModelDescription  # noqa: E402
from dlm.process.base import Process  # noqa: E402
from dlm.sampler import Canvas  # noqa: E402
import dlm.sampler.renoise as rn  # noqa: E402
from dlm.sampler.renoise import (RenoiseSampler, entropy, entropy_bound_accept, stable_and_confident,  # noqa: E402
                                 temperature_at)

N, T_MIN, T_MAX = 48, 0.4, 0.8


def test_the_temperature_schedule_is_transformers():
    processor = gd.LinearTemperatureScheduleLogitsProcessor(t_min=T_MIN, t_max=T_MAX, max_denoising_steps=N)
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    for n in range(N, 0, -1):  # transformers' cur_step: the steps left, N .. 1
        theirs = processor(None, logits, cur_step=torch.tensor(n, dtype=torch.int32))
        ours = logits / temperature_at(torch.tensor([float(n)]), N, T_MIN, T_MAX)[:, None, None]
        assert torch.equal(theirs, ours), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_acceptance_and_renoising_masks_are_transformers(dtype):
    g = torch.Generator().manual_seed(1)
    for trial in range(300):
        B, L, V = 2, int(torch.randint(2, 40, (), generator=g)), 11
        sharp = float(torch.rand((), generator=g)) * 12  # from flat to nearly one-hot predictions
        logits = (torch.randn(B, L, V, generator=g, dtype=torch.float64) * sharp).to(dtype)
        bound = [0.01, 0.1, 0.5, 2.0][trial % 4]
        sampler = gd.EntropyBoundSampler(gd.EntropyBoundSamplerConfig(entropy_bound=bound), canvas_length=L,
                                         vocab_size=V, max_denoising_steps=N)
        current = torch.randint(V, (B, L), generator=g)
        denoised = torch.randint(V, (B, L), generator=g)
        accepted_canvas = sampler.accept_canvas(current, denoised, logits, cur_step=1)
        theirs = sampler.accepted_token_mask
        h = entropy(logits)
        assert torch.allclose(h, torch.distributions.Categorical(logits=logits).entropy(), rtol=0, atol=0)
        ours = entropy_bound_accept(h, torch.ones(B, L, dtype=torch.bool), bound)
        assert torch.equal(ours, theirs)
        fresh = torch.randint(V, (B, L), generator=g)
        with mock.patch.object(torch, "randint", lambda *a, **k: fresh):
            renoised = sampler.renoise_canvas(accepted_canvas, cur_step=1)
        assert torch.equal(renoised, torch.where(ours, denoised, fresh))  # renoising mask: the complement


def test_the_stopping_decision_is_transformers_step_by_step():
    """StableAndConfidentStoppingCriteria (stateful: its argmax history) vs dlm's rule with the history the sampler
    keeps, over argmax canvases and logits that become stable and confident at known steps."""
    g = torch.Generator().manual_seed(2)
    for k in (0, 1, 2, 3):
        criteria = gd.StableAndConfidentStoppingCriteria(stability_threshold=k, confidence_threshold=0.005)
        B, L, V = 3, 6, 5
        history = torch.full((B, L, k), -1, dtype=torch.long)
        final = torch.randint(V, (B, L), generator=g)
        settle = [2, 5, 9]  # row b's argmax canvas is `final` from this step on
        for step in range(12):
            argmax = torch.stack([final[b] if step >= settle[b] else torch.randint(V, (L,), generator=g)
                                  for b in range(B)])
            sharp = torch.tensor([30.0 if step >= settle[b] + 1 else 2.0 for b in range(B)])
            logits = torch.nn.functional.one_hot(argmax, V).float() * sharp[:, None, None]
            theirs = criteria(argmax, logits)
            ours = stable_and_confident(history, argmax, entropy(logits).mean(1), torch.ones(B, L, dtype=torch.bool),
                                        0.005)
            if k:
                history = torch.cat((history[..., 1:], argmax[..., None]), -1)
            assert torch.equal(ours, theirs), (k, step)


class UniformToy(Process):
    """A uniform-state process over the toy vocabulary (its prior: uniform tokens)."""

    name, corruption = "uniform_crosscheck_test", "uniform"


def run_both(net, process, canvas, seed, bound, k, threshold):
    """dlm's sampler step by step (its draws recorded), then transformers' `_denoising_step` from the same canvas,
    fed those draws. Returns per-step records of both."""
    sampler = RenoiseSampler(max_denoising_steps=N, entropy_bound=bound, stability_threshold=k,
                             confidence_threshold=threshold, feedback=Recorder())
    draws, fresh = [], []
    real_sample, real_prior = rn.sample_tokens, process.prior

    def sample_tokens(*a, **kw):
        out = real_sample(*a, **kw)
        draws.append(out.clone())
        return out

    def prior(canvas, where, generator=None):
        out = real_prior(canvas, where, generator)
        fresh.append(out.clone())
        return out

    ours = []
    with mock.patch.object(rn, "sample_tokens", sample_tokens), mock.patch.object(process, "prior", prior):
        state = sampler.start(net, process, canvas, [torch.Generator().manual_seed(seed)])
        while not bool(state.done.all()):
            state, event = sampler.step(state)
            ours.append(dict(canvas=state.extras["canvas"].clone(), argmax=state.tokens.clone(),
                             accepted=event.committed.clone(), done=state.done.clone(),
                             fed=sampler.feedback.seen[-1]))
    B, L = canvas.shape
    V = process.vocab_size
    model = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(vocab_size=V)),
                            model=SimpleNamespace(decoder=SimpleNamespace(embed_tokens=net.embed)))
    eb = gd.EntropyBoundSampler(gd.EntropyBoundSamplerConfig(entropy_bound=bound), canvas_length=L, vocab_size=V,
                                max_denoising_steps=N)
    processors = gd.LogitsProcessorList([gd.LinearTemperatureScheduleLogitsProcessor(T_MIN, T_MAX, N)])
    stopping = gd.StableAndConfidentStoppingCriteria(k, threshold)

    def decoder_forward(decoder_input_ids, **kw):
        return SimpleNamespace(logits=process.forward_logits(net, decoder_input_ids, None))

    current, argmax, sc = canvas.tokens.clone(), canvas.tokens.clone(), None
    finished = torch.zeros(B, dtype=torch.bool)
    theirs = []
    for i, cur_step in enumerate(range(N, 0, -1)):
        with mock.patch.object(torch, "multinomial", lambda probs, num_samples: draws[i].reshape(-1, 1)), \
                mock.patch.object(torch, "randint", lambda *a, **kw: fresh[i]):
            current, argmax, sc, finished = gd.DiffusionGemmaGenerationMixin._denoising_step(
                model, decoder_forward, current, argmax, None, None, sc, None, None, finished, cur_step, eb,
                processors, stopping)
        theirs.append(dict(canvas=current.clone(), argmax=argmax.clone(), accepted=eb.accepted_token_mask.clone(),
                           done=finished.clone(), fed=sc.clone()))
        if bool(finished.all()):
            break
    return ours, theirs


class Recorder:
    """A feedback that records the logits it is given (what the next call would be conditioned on) and feeds
    nothing (the toy network takes no self-conditioning input)."""

    label, short = "recorder", "R"

    def __init__(self):
        self.seen = []

    def __call__(self, network, z, logits, fixed, masks_left):
        self.seen.append(logits.clone())
        return None


STOPS = {}  # case -> steps taken (adaptive stopping ends some cases early)


@pytest.mark.parametrize("seed,bound,k,threshold", [(0, 0.1, 1, 0.005), (1, 0.3, 2, 0.05), (2, 0.1, 1, 0.5),
                                                    (3, 1.0, 0, 0.2)])
def test_a_whole_denoising_loop_agrees_with_transformers(tiny_network, seed, bound, k, threshold):
    V, L = 13, 12
    net = tiny_network(V, seed=seed)
    with torch.no_grad():  # confident predictions, so rows stop before the last step
        net.head.weight.mul_(4.0)
    process = UniformToy(mask_id=None)
    process.description = ModelDescription(vocab_size=V, d_model=32)
    canvas = Canvas(torch.randint(V, (1, L), generator=torch.Generator().manual_seed(seed)),
                    torch.ones(1, L, dtype=torch.bool))
    with torch.no_grad():
        ours, theirs = run_both(net, process, canvas, seed, bound, k, threshold)
    assert len(ours) == len(theirs), (len(ours), len(theirs))  # the same stopping step
    STOPS[(seed, bound, k, threshold)] = len(ours)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for key in ("canvas", "argmax", "accepted"):
            assert torch.equal(a[key], b[key]), (step, key)
        assert torch.equal(a["done"], b["done"] | (step == N - 1)), step  # dlm's done also marks the step limit
        assert torch.equal(a["fed"], b["fed"].float()), step  # the self-conditioning logits: temperature-scaled
    assert any(int(a["accepted"].sum()) > 1 for a in ours)  # several positions accepted at once somewhere


def test_some_loops_stopped_early():
    if len(STOPS) < 4:
        pytest.skip("runs after the loop comparisons")
    assert min(STOPS.values()) < N, STOPS
