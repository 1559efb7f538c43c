"""The renoising sampler (dlm/sampler/renoise.py) and the entropy-bound policy of the LLaDA sampler: each rule against
a brute-force reading of its definition, the sampler's step mechanics on a uniform-state and an absorbing process,
adaptive stopping, and the calls the entropy bound saves on a confident network."""

import itertools
import math

import pytest
import torch

from dlm.process import MaskedDiffusion, ModelDescription
from dlm.process.base import Process
from dlm.process.schedules import LogLinearSchedule
from dlm.sampler import BlockwiseSampler, Canvas
from dlm.sampler.llada import generate_llada
from dlm.sampler.policies import CountSchedule, EntropyBound, make_policy
from dlm.sampler.registry import make_sampler
from dlm.sampler.renoise import (RenoiseSampler, entropy, entropy_bound_accept, stable_and_confident,
                                 temperature_at)
from tests.toy_canvas import MASK, V, canvas_and_fixed


def brute_accept(h: list[float], bound: float) -> set[int]:
    """The definition read literally: sort ascending; the largest k with sum_{i<=k} H - max_{i<=k} H <= bound."""
    order = sorted(range(len(h)), key=lambda i: (h[i], i))
    best = 1
    for k in range(1, len(h) + 1):
        top = [h[i] for i in order[:k]]
        if sum(top) - max(top) <= bound:
            best = k
    return set(order[:best])


def test_entropy_bound_acceptance_is_the_definition():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        L = int(torch.randint(1, 12, (), generator=g))
        h = torch.rand(3, L, generator=g, dtype=torch.float64) * float(torch.rand((), generator=g)) * 0.3
        candidates = torch.rand(3, L, generator=g) < 0.7
        candidates[:, 0] = True
        bound = [0.01, 0.1, 0.3][trial % 3]
        got = entropy_bound_accept(h, candidates, bound)
        for b in range(3):
            idx = candidates[b].nonzero().flatten().tolist()
            want = {idx[i] for i in brute_accept([float(h[b, j]) for j in idx], bound)}
            assert set(got[b].nonzero().flatten().tolist()) == want
            lowest = idx[min(range(len(idx)), key=lambda i: float(h[b, idx[i]]))]
            assert bool(got[b, lowest])  # the lowest entropy is always accepted
    none = entropy_bound_accept(torch.rand(2, 5), torch.zeros(2, 5, dtype=torch.bool), 0.1)
    assert not bool(none.any())  # no candidate, nothing accepted


def test_entropy_and_temperature_schedule():
    p = torch.tensor([0.5, 0.25, 0.25, 0.0])
    assert math.isclose(float(entropy(p.log())), -(0.5 * math.log(0.5) + 0.5 * math.log(0.25)), rel_tol=1e-6)
    N = 48
    temps = [temperature_at(n, N, 0.4, 0.8) for n in range(N, 0, -1)]  # n counts the steps left
    assert math.isclose(temps[0], 0.8) and math.isclose(temps[-1], 0.4 + 0.4 / N)
    assert all(a > b for a, b in zip(temps, temps[1:]))


def test_stable_and_confident():
    argmax = torch.tensor([[1, 2, 3], [1, 2, 3]])
    where = torch.tensor([[True, True, False], [True, True, True]])
    history = torch.tensor([[[1, 1], [2, 2], [9, 9]], [[1, 1], [2, 2], [9, 3]]])  # (B, L, k=2)
    low = torch.tensor([0.001, 0.001])
    assert stable_and_confident(history, argmax, low, where, 0.005).tolist() == [True, False]
    assert stable_and_confident(history, argmax, torch.tensor([0.01, 0.0]), where, 0.005).tolist() == [False, False]
    assert stable_and_confident(history[..., :0], argmax, low, where, 0.005).tolist() == [True, True]  # k = 0


def test_the_policy_brute_force_and_the_renoise_rule_agree():
    """The LLaDA policy: in score order, the longest prefix with sum(H) - max(H) <= bound (brute force over
    prefixes); scored by exp(-H) (remasking='entropy') it commits exactly what the renoise rule accepts."""
    g = torch.Generator().manual_seed(1)
    policy = EntropyBound(0.1)
    for _ in range(100):
        L = int(torch.randint(1, 10, (), generator=g))
        h = torch.rand(2, L, generator=g, dtype=torch.float64) * 0.15
        conf = torch.rand(2, L, generator=g, dtype=torch.float64)
        cand = torch.rand(2, L, generator=g) < 0.8
        cand[:, -1] = True
        conf = conf.masked_fill(~cand, float("-inf"))
        got = policy.select(conf, cand.sum(1), 0, 4, entropy=h)
        for b in range(2):
            idx = sorted(cand[b].nonzero().flatten().tolist(), key=lambda i: (-float(conf[b, i]), i))
            k = max(n for n in range(1, len(idx) + 1)
                    if all(sum(float(h[b, i]) for i in idx[:m]) - max(float(h[b, i]) for i in idx[:m]) <= 0.1
                           for m in range(1, n + 1)))
            assert set(got[b].nonzero().flatten().tolist()) == set(idx[:k])
        by_entropy = policy.select((-h).exp().masked_fill(~cand, float("-inf")), cand.sum(1), 0, 4, entropy=h)
        assert torch.equal(by_entropy, entropy_bound_accept(h, cand, 0.1))
    assert isinstance(make_policy(entropy_bound=0.2), EntropyBound)
    with pytest.raises(ValueError, match="not several"):
        make_policy(threshold=0.9, entropy_bound=0.1)
    with pytest.raises(ValueError, match="entropy_bound=0"):
        make_sampler("llada", entropy_bound=0.0)


def sharpen(net, scale: float):
    """The network with its output layer scaled: confident (low-entropy) predictions."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "head" in name or "output" in name or "lm_head" in name:
                p.mul_(scale)
    return net


def test_entropy_bound_in_llada_takes_fewer_calls_than_one_token_per_step(tiny_network):
    net = sharpen(tiny_network(V, seed=3), 6.0)
    mdlm = MaskedDiffusion(LogLinearSchedule(1e-3), MASK)
    prompts = [[0, 5, 6, 7], [0, 4]]
    fixed_k = generate_llada(net, mdlm, prompts, 16, steps=16, block_length=16)  # one token per call
    eb = generate_llada(net, mdlm, prompts, 16, steps=16, block_length=16, policy=EntropyBound(0.1))
    assert fixed_k.nfe == 16 and eb.nfe < fixed_k.nfe
    assert (mdlm.is_noise(eb.tokens)).sum() == 0
    loose = generate_llada(net, mdlm, prompts, 16, steps=16, block_length=16, policy=EntropyBound(1.0))
    assert loose.nfe <= eb.nfe  # a looser bound commits more per call


class UniformTest(Process):
    """A uniform-state process for the test (prior: uniform tokens over the vocabulary)."""

    name, corruption = "uniform_renoise_test", "uniform"


def uniform_process(vocab: int = V) -> Process:
    process = UniformTest(mask_id=None)
    process.description = ModelDescription(vocab_size=vocab, d_model=32)
    return process


def test_one_step_accepts_candidates_and_renoises_the_rest(tiny_network):
    net, process = tiny_network(V, seed=3), uniform_process()
    canvas, fixed = canvas_and_fixed(3)
    canvas = Canvas.from_fixed(canvas.clamp_max(V - 1), fixed, process, torch.Generator().manual_seed(0))
    sampler = RenoiseSampler(entropy_bound=0.5)
    state = sampler.start(net, process, canvas, [torch.Generator().manual_seed(i) for i in range(3)])
    before = state.extras["canvas"].clone()
    state, event = sampler.step(state)
    after = state.extras["canvas"]
    gen = canvas.to_generate
    assert torch.equal(after[~gen], before[~gen]) and torch.equal(state.tokens[~gen], canvas.tokens[~gen])
    assert bool(event.committed.any(1).all()) and not bool((event.committed & ~gen).any())
    # the argmax canvas is the argmax of the prediction at every generated position
    raw = process.forward_logits(net, before, None)
    assert torch.equal(state.tokens[gen], raw.argmax(-1)[gen])
    assert state.calls == 1 and state.nfe_per_row.tolist() == [1, 1, 1]
    renoised = gen & ~event.committed
    assert float((after[renoised] != before[renoised]).float().mean()) > 0.5  # fresh uniform draws


def test_adaptive_stopping_ends_rows_early_and_fixed_steps_run_them_all(tiny_network):
    net, process = sharpen(tiny_network(V, seed=3), 8.0), uniform_process()
    canvas, fixed = canvas_and_fixed(3)
    canvas = Canvas.from_fixed(canvas.clamp_max(V - 1), fixed, process, torch.Generator().manual_seed(0))
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    adaptive = RenoiseSampler(max_denoising_steps=48).sample(net, process, canvas, gens())
    fixed_steps = RenoiseSampler(max_denoising_steps=48, confidence_threshold=None).sample(net, process, canvas, gens())
    assert fixed_steps.nfe == 48 and fixed_steps.nfe_per_row.tolist() == [48, 48, 48]
    assert int(adaptive.nfe_per_row.max()) < 48
    gen_count = int(canvas.to_generate[0].sum())
    assert torch.allclose(adaptive.tokens_per_forward, gen_count / adaptive.nfe_per_row.double())
    # the stop rule itself: the last two argmax canvases of a stopped row agree
    seen = []
    RenoiseSampler(max_denoising_steps=48).sample(net, process, canvas, gens(),
                                                  lambda e: seen.append(e.tokens.clone()) and None)
    row = int(adaptive.nfe_per_row.argmin())
    n = int(adaptive.nfe_per_row[row])
    assert n >= 2 and torch.equal(seen[n - 1][row], seen[n - 2][row])


def test_absorbing_renoise_is_remasking_and_never_undoes_a_token(tiny_network):
    """On MDLM (SUBS carry-over) renoise = remask: a position once filled keeps its token; each step fills at least
    one [MASK]; the row ends when none is left (the EB-sampler)."""
    net, mdlm = tiny_network(V, seed=3), MaskedDiffusion(LogLinearSchedule(1e-3), MASK)
    canvas = Canvas.from_fixed(*canvas_and_fixed(2))
    trajectory = []
    out = RenoiseSampler().sample(net, mdlm, canvas, torch.Generator().manual_seed(0),
                                  lambda e: trajectory.append(e) and None)
    masks = int(canvas.to_generate[0].sum())
    assert not bool(mdlm.is_noise(out.tokens).any()) and 1 <= out.nfe <= masks
    filled = torch.zeros_like(canvas.to_generate)
    tokens = canvas.tokens.clone()
    for e in trajectory:
        assert torch.equal(e.tokens[filled], tokens[filled])  # nothing filled is ever changed or remasked
        filled |= e.committed
        tokens = e.tokens.clone()


def test_renoise_runs_block_by_block_inside_the_blockwise_wrapper(tiny_network):
    from dlm.process.block_diffusion import BlockDiffusion

    net = tiny_network(V, seed=3)
    process = BlockDiffusion(LogLinearSchedule(1e-3), MASK, 4)
    canvas = Canvas.from_fixed(*canvas_and_fixed(2))
    cached = BlockwiseSampler(RenoiseSampler(max_denoising_steps=6), 4, kv_cache=True)
    plain = BlockwiseSampler(RenoiseSampler(max_denoising_steps=6), 4, kv_cache=False)
    a = cached.sample(net, process, canvas, torch.Generator().manual_seed(0))
    b = plain.sample(net, process, canvas, torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens)  # the cached context is exact for a block-causal process
    assert not bool(process.is_noise(a.tokens).any())


def test_options_are_checked():
    for bad, match in [(dict(max_denoising_steps=0), "max_denoising_steps"), (dict(t_min=0.9), "t_min"),
                       (dict(entropy_bound=0.0), "entropy_bound"), (dict(stability_threshold=-1), "stability"),
                       (dict(confidence_threshold=0.0), "confidence_threshold")]:
        with pytest.raises(ValueError, match=match):
            make_sampler("renoise", **bad)
    s = make_sampler("renoise")
    assert (s.max_denoising_steps, s.t_max, s.t_min, s.entropy_bound, s.stability_threshold,
            s.confidence_threshold) == (48, 0.8, 0.4, 0.1, 1, 0.005)
    assert set(s.corruptions) == {"uniform", "absorbing"} and s.takes_feedback


def test_a_block_causal_model_passes_renoise_its_options_through_the_blockwise_wrapper():
    """`generate(sampler="renoise", max_denoising_steps=...)` on a BD3-LM model: the blockwise wrapper runs renoise
    in each block with the options given (`inner_options`), and `dlm sample -o` parses them by renoise's fields."""
    from tests.golden import cases as G

    torch.manual_seed(0)
    model = G.models()["bd3lm"]
    gen = model.generate(prompts=["And God said"], gen_length=16, sampler="renoise", max_denoising_steps=2,
                         confidence_threshold=None, seed=0)
    blocks = 3  # the 16 generated tokens after the 12-token prompt straddle blocks 1..3 of 8
    assert gen.nfe == blocks * 2 + blocks  # two steps per block, one cache fill before each
    assert torch.allclose(gen.tokens_per_forward, torch.tensor([16 / gen.nfe], dtype=torch.float64))
    assert model.sampler_options("renoise", ["max_denoising_steps=5", "kv_cache=false"]) == \
        {"max_denoising_steps": 5, "kv_cache": False}
    with pytest.raises(ValueError, match="sampler 'renoise' has no option 'eta'"):
        model.sampler_options("renoise", ["eta=0.1"])
