"""A new sampler is one file: a ~20-line sampler defined here, registered by name, passes the same contract checks
as the library's samplers and is built through `make_sampler`."""

from dataclasses import dataclass

import pytest
import torch

from dlm.process.block_diffusion import BlockDiffusion
from dlm.process.schedules import LogLinearSchedule
from dlm.sampler import Sampler
from dlm.sampler.base import StepReporter, forward_live
from dlm.sampler.registry import ALIASES, SAMPLERS, make_sampler, register_sampler
from tests.sampler.test_contract import CHECKS, blockwise_of, setup
from tests.toy_canvas import MASK


@dataclass
class MostConfidentConfig:
    pass  # no options: greedy, one token per row and step


class MostConfident(Sampler):
    """Commit the single most confident noise position of each row per step (greedy)."""

    name = "most_confident"

    def sample(self, network, process, canvas, generator=None, callback=None):
        process.check_sampler(self)
        z, B = canvas.tokens.clone(), canvas.shape[0]
        steps = StepReporter(B, callback)
        while True:
            live = steps.live(z.device)
            open_ = process.is_noise(z) & canvas.to_generate & live[:, None]  # (B, L)
            if not open_.any():
                return steps.output(z)
            logits = forward_live(process, network, z, torch.ones(B), None, live, canvas)  # padding unseen
            steps.called()
            prob, token = process.denoise(logits).softmax(-1).max(-1)  # (B, L) each
            pos = prob.masked_fill(~open_, -1.0).argmax(1)  # (B,)
            committed = torch.zeros_like(open_).scatter_(1, pos[:, None], True) & open_
            z = torch.where(committed, token, z)
            steps.report(z, committed, torch.where(committed, prob, 0.0))


@pytest.fixture
def registered():
    register_sampler("most_confident", MostConfidentConfig)(MostConfident)
    yield
    SAMPLERS.pop("most_confident")
    assert "most_confident" not in ALIASES


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_the_toy_sampler_meets_the_contract(registered, tiny_network, check):
    sampler = make_sampler("most_confident")
    assert isinstance(sampler, MostConfident) and SAMPLERS["most_confident"].description.startswith("Commit")
    check(*setup("most_confident", tiny_network))
    _, net, _, canvas = setup("most_confident", tiny_network)  # and inside the blockwise wrapper, on BD3-LM
    check(blockwise_of("most_confident", MostConfident), net, BlockDiffusion(LogLinearSchedule(1e-3), MASK, 4), canvas)


def test_unknown_options_are_refused(registered):
    with pytest.raises(ValueError, match="sampler 'most_confident' does not accept steps; its options: \\(none\\)"):
        make_sampler("most_confident", steps=8)
