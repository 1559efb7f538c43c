"""The ready callbacks: a trajectory recorder, a progress bar and chaining (stops combine by OR)."""

import pytest
import torch

from dlm.sampler import AncestralSampler, Canvas, ProgressBar, TrajectoryRecorder, chain_callbacks
from dlm.sampler.base import StepEvent, stop_mask
from tests.toy_canvas import canvas_and_fixed, process


def event(step=0, B=3, L=4):
    tokens = torch.arange(B * L).view(B, L)
    return StepEvent(step, tokens, torch.zeros(B, L, dtype=torch.bool), None, step + 1, torch.full((B,), step + 1))


def test_recorder_keeps_copies_and_one_row():
    rec, row = TrajectoryRecorder(), TrajectoryRecorder(row=1)
    e = event()
    rec(e), row(e)
    e.tokens += 100  # a sampler changes its canvas in place: the recorded copies do not change
    assert rec.canvases[0][0, 0] == 0 and rec.canvases[0].shape == (3, 4)
    assert row.canvases[0].tolist() == [[4, 5, 6, 7]]


def test_progress_bar_counts_steps_and_is_quiet_off_a_terminal():
    bar = ProgressBar(total=8)
    assert bar.bar.disable  # pytest's stderr is not a terminal
    for step in range(5):
        bar(event(step))
    assert bar.steps == 5
    bar.close()


def test_chain_combines_stops():
    calls = []
    first = lambda e: calls.append("first") or torch.tensor([True, False, False])  # noqa: E731
    second = lambda e: calls.append("second") or torch.tensor([False, False, True])  # noqa: E731
    assert chain_callbacks(first, None, second)(event()).tolist() == [True, False, True]
    assert calls == ["first", "second"]  # every callback sees every event
    assert chain_callbacks(None) is None and chain_callbacks(first) is first
    assert chain_callbacks(lambda e: None, lambda e: False)(event()) is None


def test_stop_answers_are_checked():
    assert stop_mask(None, 2).tolist() == stop_mask(False, 2).tolist() == [False, False]
    assert stop_mask(True, 2).tolist() == [True, True]
    with pytest.raises(ValueError, match=r"\(3,\) bool tensor"):
        stop_mask(torch.ones(2, dtype=torch.bool), 3)


def test_a_progress_bar_watches_a_sampler(tiny_network):
    canvas, fixed = canvas_and_fixed(2)
    bar = ProgressBar(total=6)
    out = AncestralSampler(6).sample(tiny_network(12), process(), Canvas.from_fixed(canvas, fixed), None, bar)
    assert bar.steps in (6, 7) and out.nfe <= bar.steps  # one event per step (and the final argmax, if any)
