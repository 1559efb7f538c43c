"""A toy masked-diffusion setting shared by sampler tests: a 12-token vocabulary and a 16-position canvas with
a prompt, an infill span and masks on both sides of it."""

import torch

from dlm.process import MaskedDiffusion
from dlm.process.schedules import LogLinearSchedule

V, MASK, BOS, L = 12, 11, 0, 16


def canvas_and_fixed(B=4):
    """BOS + a 3-token prompt, 8 masks, 2 fixed infill tokens, 2 masks."""
    canvas = torch.full((B, L), MASK)
    canvas[:, 0] = BOS
    canvas[:, 1:4] = torch.tensor([5, 6, 7])
    canvas[:, 12:14] = torch.tensor([8, 9])
    return canvas, canvas != MASK


def process():
    return MaskedDiffusion(LogLinearSchedule(1e-3), MASK)


def sample(sampler, network, process, canvas, fixed, generator=None, record_trajectory=False, callback=None):
    """`sampler.sample` on the canvas (B, L) with `fixed` (B, L) given positions; with record_trajectory, the
    output gets `.trajectory`: the canvas after every step (a TrajectoryRecorder)."""
    from dlm.sampler import Canvas, TrajectoryRecorder
    from dlm.sampler.callbacks import chain_callbacks

    recorder = TrajectoryRecorder() if record_trajectory else None
    out = sampler.sample(network, process, Canvas.from_fixed(canvas, fixed), generator,
                         chain_callbacks(recorder, callback))
    if recorder is not None:
        out.trajectory = recorder.canvases
    return out


def llada_with_trajectory(*args, **kw):
    """dlm.sampler.llada.generate_llada, with `.trajectory`: the canvas after every step (a TrajectoryRecorder)."""
    from dlm.sampler import TrajectoryRecorder
    from dlm.sampler.llada import generate_llada

    recorder = TrajectoryRecorder()
    out = generate_llada(*args, callback=recorder, **kw)
    out.trajectory = recorder.canvases
    return out
