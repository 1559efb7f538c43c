"""The `uniform_ancestral` sampler on uniform-state (udlm) and GIDD-mix (gidd) models: the shared sampler contract
checks on their own canvases (the contract test runs it on MDLM), its step draws from `process.reverse_probs`,
per-row batch invariance with prompts of other lengths, and self-conditioning fed at sampling."""

import pytest
import torch

from dlm.process import ModelDescription, make_process
from dlm.process.uniform import GIDDConfig, UniformConfig
from dlm.sampler import Canvas
from dlm.sampler.registry import make_sampler
from tests.sampler.test_contract import CHECKS
from tests.toy_canvas import MASK, V, canvas_and_fixed


def build(name: str, **fields):
    cfg = (UniformConfig if name == "udlm" else GIDDConfig)(**fields)
    return make_process(cfg, ModelDescription(vocab_size=V, d_model=32, mask_id=MASK, context=32))


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", ["udlm", "gidd"])
def test_the_sampler_contract_on_uniform_and_mixed_models(tiny_network, name, check):
    process, net = build(name), tiny_network(V, seed=3)
    canvas, fixed = canvas_and_fixed(3)
    canvas = Canvas.from_fixed(canvas, fixed, process, torch.Generator().manual_seed(0))
    sampler = make_sampler("uniform_ancestral", steps=8, temperature=0.9)
    check(sampler, net, process, canvas)
    out = sampler.sample(net, process, canvas, torch.Generator().manual_seed(0))
    assert not bool((out.tokens == MASK).any())  # no [MASK] left, and udlm never draws one
    assert out.nfe == 9 and out.nfe_per_row.tolist() == [9, 9, 9]  # steps + the final argmax


@pytest.mark.parametrize("name", ["udlm", "gidd"])
def test_a_step_draws_from_the_reverse_posterior(tiny_network, name):
    """2,000 copies of one canvas (each its own generator) take one step: the tokens drawn at a position follow
    process.reverse_probs(x_theta, z_t, t_0 = 1, t_1) (chi-square, 3 degrees of freedom or fewer)."""
    process, net = build(name), tiny_network(V, seed=3)
    n, steps = 2000, 4
    tokens = torch.tensor([[0, 5, 6, 2, 9]]).repeat(n, 1)
    if name == "gidd":
        tokens[:, 2:] = MASK  # its prior
    to_generate = torch.zeros_like(tokens, dtype=torch.bool)
    to_generate[:, 2:] = True
    sampler = make_sampler("uniform_ancestral", steps=steps)
    state = sampler.start(net, process, Canvas(tokens, to_generate), [torch.Generator().manual_seed(i)
                                                                      for i in range(n)])
    with torch.no_grad():
        logits = process.forward_logits(net, tokens[:1], None)[0]  # (L, V)
    state, _ = sampler.step(state)
    t, s = torch.tensor([1.0], dtype=torch.float64), sampler.times(process)[1:2]
    for pos in (2, 4):
        probs = torch.softmax(process.denoise(logits[pos]).double(), -1)
        want = process.reverse_probs(probs[None], tokens[:1, pos], t, s)[0]  # (V,)
        counts = torch.bincount(state.tokens[:, pos], minlength=V).double()
        assert bool((counts[want == 0] == 0).all())
        keep = want > 0
        chi2 = float((((counts - n * want) ** 2) / (n * want).clamp(min=1e-12))[keep].sum())
        assert chi2 < 30.0, (pos, chi2, counts.tolist(), (n * want).tolist())  # p < 1e-5 at <= 11 dof


def test_rows_are_batch_invariant_with_prompts_of_other_lengths(tiny_network):
    process, net = build("udlm", self_conditioning=0.5), tiny_network(V, seed=3)
    with torch.no_grad():
        process.self_conditioner.down.weight.normal_(0.0, 0.3)  # a trained-looking block: feedback matters
    sampler = make_sampler("uniform_ancestral", steps=5, feedback=process.feedback())
    prompts = [[0, 5, 6, 7], [0, 4], [0, 3, 9]]
    gens = lambda rows: [torch.Generator().manual_seed(50 + r) for r in rows]  # noqa: E731
    canvas = Canvas.left_padded(prompts, 6, process, pad_id=2, generator=gens(range(3)))
    together = sampler.sample(net, process, canvas, gens(range(3))).tokens
    for r, p in enumerate(prompts):
        alone = sampler.sample(net, process, Canvas.left_padded([p], 6, process, generator=gens([r])), gens([r]))
        assert torch.equal(together[r, -6:], alone.tokens[0, -6:]), r
        assert torch.equal(together[r, -6 - len(p):-6], torch.tensor(p))  # the prompt kept


def test_self_conditioning_is_fed_at_sampling_and_starts_plain(tiny_network):
    """A zero-initialised block gives the plain model's tokens exactly; a non-zero one changes them (the feedback
    reaches the network), and only from the second call on."""
    process, net = build("udlm", self_conditioning=0.5), tiny_network(V, seed=3)
    canvas, fixed = canvas_and_fixed(2)
    canvas = Canvas.from_fixed(canvas, fixed, process, torch.Generator().manual_seed(0))
    plain = make_sampler("uniform_ancestral", steps=6)
    fed = make_sampler("uniform_ancestral", steps=6, feedback=process.feedback())
    run = lambda s: s.sample(net, process, canvas, torch.Generator().manual_seed(1)).tokens  # noqa: E731
    assert torch.equal(run(plain), run(fed))
    with torch.no_grad():
        process.self_conditioner.down.weight.normal_(0.0, 0.3)
    assert not torch.equal(run(plain), run(fed))
    first = []
    one_step = make_sampler("uniform_ancestral", steps=6, feedback=process.feedback())
    state = one_step.start(net, process, canvas, torch.Generator().manual_seed(1))
    state, _ = one_step.step(state)
    first.append(state.tokens.clone())
    state = plain.start(net, process, canvas, torch.Generator().manual_seed(1))
    state, _ = plain.step(state)
    assert torch.equal(first[0], state.tokens)  # the first call has no previous prediction


def test_mdlm_samplers_refuse_the_mixed_and_uniform_processes():
    for name in ("udlm", "gidd"):
        process = build(name)
        with pytest.raises(ValueError, match=f"this process's corruption is '{process.corruption}'"):
            process.check_sampler(make_sampler("ancestral", steps=4))
        process.check_sampler(make_sampler("uniform_ancestral", steps=4))
