"""Ready per-step callbacks for `Sampler.sample(..., callback=)` (events: dlm.sampler.base.StepEvent).

    rec = TrajectoryRecorder()
    sampler.sample(network, process, canvas, callback=chain_callbacks(rec, ProgressBar()))
    rec.canvases  # one (B, L) canvas per step
"""

from __future__ import annotations

import sys

import torch

from dlm.sampler.base import StepEvent, stop_mask


class TrajectoryRecorder:
    """Keeps a copy of the canvas after every step (on the CPU), e.g. for `dlm.eval.plots.plot_trajectory`.

    row: keep only that row ((1, L) canvases), which is all a plot of one sample needs."""

    def __init__(self, row: int | None = None):
        self.row = row
        self.canvases: list[torch.Tensor] = []

    def __call__(self, event: StepEvent) -> None:
        tokens = event.tokens if self.row is None else event.tokens[self.row:self.row + 1]
        self.canvases.append(tokens.detach().to("cpu", copy=True))


class ProgressBar:
    """A tqdm bar over steps with the NFE so far; quiet when stderr is not a terminal (logs, CI, tests)."""

    def __init__(self, total: int | None = None, desc: str = "sampling", disable: bool | None = None):
        from tqdm.auto import tqdm

        disable = not sys.stderr.isatty() if disable is None else disable
        self.bar = tqdm(total=total, desc=desc, unit="step", disable=disable, leave=False)
        self.steps = 0  # events seen (tqdm does not count while disabled)

    def __call__(self, event: StepEvent) -> None:
        self.steps += 1
        self.bar.update(1)
        self.bar.set_postfix(nfe=event.nfe, refresh=False)

    def close(self) -> None:
        self.bar.close()


def chain_callbacks(*callbacks):
    """One callback that calls each of `callbacks` (None entries are skipped) in order; a row stops when any of
    them stops it. None when no callback is left."""
    callbacks = [c for c in callbacks if c is not None]
    if not callbacks:
        return None
    if len(callbacks) == 1:
        return callbacks[0]

    def chained(event: StepEvent):
        B = event.tokens.shape[0]
        stop = torch.zeros(B, dtype=torch.bool)
        for callback in callbacks:
            stop |= stop_mask(callback(event), B)
        return stop if bool(stop.any()) else None

    return chained
