"""Left-to-right sampling for the autoregressive baseline: the KV cache changes nothing but the cost."""

import pytest
import torch

from dlm.process import Autoregressive
from dlm.sampler import AutoregressiveSampler
from tests.toy_canvas import sample

V, L, PROMPT = 13, 14, 4


def canvas_and_fixed(B: int = 3):
    g = torch.Generator().manual_seed(0)
    canvas = torch.full((B, L), 12)
    canvas[:, :PROMPT] = torch.randint(0, 12, (B, PROMPT), generator=g)
    fixed = torch.zeros(B, L, dtype=torch.bool)
    fixed[:, :PROMPT] = True
    return canvas, fixed


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.8, 0.9), (1.5, 0.6)])
def test_kv_cache_and_full_recompute_give_identical_tokens(tiny_network, temperature, top_p):
    net = tiny_network(V, seed=4)
    canvas, fixed = canvas_and_fixed()
    for seed in range(3):
        outs = [sample(AutoregressiveSampler(temperature, top_p, kv_cache=kv),
                       net, Autoregressive(), canvas, fixed, torch.Generator().manual_seed(seed), record_trajectory=True)
                for kv in (True, False)]
        assert torch.equal(outs[0].tokens, outs[1].tokens)
        assert outs[0].nfe == outs[1].nfe == L - PROMPT
        assert outs[0].tokens.shape == canvas.shape
        assert torch.equal(outs[0].tokens[:, :PROMPT], canvas[:, :PROMPT])
        # one step per generated token, left to right (events carry the whole (B, L) canvas)
        traj = outs[0].trajectory
        assert len(traj) == L - PROMPT
        assert all(torch.equal(t[:, :PROMPT + i + 1], outs[0].tokens[:, :PROMPT + i + 1]) for i, t in enumerate(traj))


def test_greedy_is_seed_independent_and_follows_the_causal_argmax(tiny_network):
    net = tiny_network(V, seed=5)
    canvas, fixed = canvas_and_fixed()
    runs = [sample(AutoregressiveSampler(temperature=0.0), net, Autoregressive(), canvas, fixed,
                   torch.Generator().manual_seed(s)) for s in range(3)]
    assert all(torch.equal(r.tokens, runs[0].tokens) for r in runs)
    tokens = runs[0].tokens
    with torch.no_grad():
        greedy = net(tokens[:, :-1], causal=True).argmax(-1)  # what each position's prefix predicts next
    assert torch.equal(tokens[:, PROMPT:], greedy[:, PROMPT - 1:])


def test_suppressed_ids_are_never_generated(tiny_network):
    net = tiny_network(V, seed=6)
    canvas, fixed = canvas_and_fixed(B=8)
    banned = (0, 3, 7)
    out = sample(AutoregressiveSampler(temperature=2.0, suppress_ids=banned),
                 net, Autoregressive(), canvas, fixed, torch.Generator().manual_seed(0))
    assert not bool(torch.isin(out.tokens[:, PROMPT:], torch.tensor(banned)).any())


def test_autoregressive_sampler_errors(tiny_network):
    for top_p in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="top_p"):
            AutoregressiveSampler(top_p=top_p)
    with pytest.raises(ValueError, match="temperature"):
        AutoregressiveSampler(temperature=-1.0)
    net = tiny_network(V)
    canvas, fixed = canvas_and_fixed()
    infill = fixed.clone()
    infill[:, -2:] = True  # a fixed suffix: only a diffusion model can infill
    with pytest.raises(ValueError, match="infilling"):
        sample(AutoregressiveSampler(), net, Autoregressive(), canvas, infill)
