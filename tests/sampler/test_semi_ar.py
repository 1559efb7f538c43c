"""Semi-autoregressive generation: windows of `context` tokens, each new one starting from the previous tokens."""

import pytest
import torch

from dlm.process import MaskedDiffusion
from dlm.process.schedules import LogLinearSchedule
from dlm.sampler import AncestralSampler, Canvas, semi_autoregressive

V, MASK, CONTEXT = 12, 11, 12


class Recording(AncestralSampler):
    """An ancestral sampler that keeps every window it was given and what it returned."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.calls = []

    def sample(self, network, process, canvas, generator=None, callback=None):
        out = super().sample(network, process, canvas, generator, callback)
        self.calls.append((canvas.tokens.clone(), out.tokens.clone()))
        return out


@pytest.mark.parametrize("total, stride", [(30, 5), (12 + 7, 7), (40, 11), (13, 1)])
def test_windows_chain_and_length(tiny_network, total, stride):
    net = tiny_network(V, seed=7)
    process = MaskedDiffusion(LogLinearSchedule(1e-3), MASK)
    canvas = torch.full((2, CONTEXT), MASK)
    canvas[:, :3] = torch.tensor([0, 4, 5])  # BOS + a 2-token prompt
    sampler = Recording(6, top_p=0.9)
    out = semi_autoregressive(sampler, net, process, Canvas.from_fixed(canvas, canvas != MASK), total, stride,
                              torch.Generator().manual_seed(0))

    assert out.tokens.shape == (2, total)
    assert not bool((out.tokens == MASK).any())
    assert torch.equal(out.tokens[:, :3], canvas[:, :3])  # the first window's prompt is kept
    first_in, first_out = sampler.calls[0]
    assert torch.equal(first_in, canvas) and torch.equal(out.tokens[:, :CONTEXT], first_out)
    done = CONTEXT
    for window, result in sampler.calls[1:]:
        new = min(stride, total - done)
        assert window.shape == (2, CONTEXT)
        assert torch.equal(window[:, :CONTEXT - new], out.tokens[:, done - (CONTEXT - new):done])  # prefix = the past
        assert bool((window[:, CONTEXT - new:] == MASK).all())
        assert torch.equal(result[:, :CONTEXT - new], window[:, :CONTEXT - new])  # the prefix stays fixed
        assert torch.equal(out.tokens[:, done:done + new], result[:, CONTEXT - new:])
        done += new
    assert done == total
    assert out.nfe > 0


def test_semi_autoregressive_errors(tiny_network):
    net = tiny_network(V)
    process = MaskedDiffusion(LogLinearSchedule(1e-3), MASK)
    canvas = torch.full((1, CONTEXT), MASK)
    for stride in (0, CONTEXT, CONTEXT + 3):
        with pytest.raises(ValueError, match="stride"):
            semi_autoregressive(AncestralSampler(4), net, process, Canvas.from_fixed(canvas, canvas != MASK), 20, stride)
    with pytest.raises(ValueError, match="total_length"):
        semi_autoregressive(AncestralSampler(4), net, process, Canvas.from_fixed(canvas, canvas != MASK), CONTEXT - 1, 4)
