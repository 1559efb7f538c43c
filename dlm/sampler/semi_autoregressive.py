"""Semi-autoregressive generation of any length with a fixed-context diffusion model.

Generate a window of `context` tokens; then repeatedly keep its last `context - stride` tokens as a fixed
prefix, append `stride` positions from the prior and denoise them with the inner sampler (Sahoo et al. 2024,
section 4.2). The callback sees (B, total_length) canvases: the tokens so far, the window, and the prior after it.
"""

from __future__ import annotations

import torch

from dlm.sampler.base import Canvas, SampleOutput, Sampler, StepEvent, StepReporter, generators_of


def semi_autoregressive(sampler: Sampler, network, process, canvas: Canvas, total_length: int,
                        stride: int, generator=None, callback=None) -> SampleOutput:
    """canvas (B, context): the first window (prompt + positions to generate). Returns (B, total_length) tokens.
    Rows stopped by the callback in one window sit out the later windows."""
    B, context = canvas.shape
    if not 0 < stride < context:
        raise ValueError(f"stride={stride} must be in (0, context={context})")
    if total_length < context:
        raise ValueError(f"total_length={total_length} is shorter than one window ({context}); use the sampler directly")
    steps = StepReporter(B, callback)
    full = process.prior(torch.cat((canvas.tokens, canvas.tokens.new_zeros(B, total_length - context)), 1),
                         torch.arange(total_length, device=canvas.tokens.device) >= context, generator)
    full[:, :context] = canvas.tokens  # (B, total_length)
    start, window = 0, canvas
    while True:
        rows = steps.live().nonzero().squeeze(1).to(full.device)
        relay = None if callback is None else _relay(steps, full, rows, start)
        base_nfe, base_rows = steps.nfe, steps.nfe_per_row.clone()
        out = sampler.sample(network, process, window.select(rows), generators_of(generator, rows), relay)
        full[rows, start:start + context] = out.tokens
        steps.nfe = base_nfe + out.nfe
        steps.nfe_per_row[rows.cpu()] = base_rows[rows.cpu()] + out.nfe_per_row
        if out.tokens_computed is not None:
            steps.tokens_computed[rows.cpu()] += out.tokens_computed
        steps.stopped[rows.cpu()] |= out.stopped
        done = start + context
        if done >= total_length or steps.all_stopped:
            break
        new = min(stride, total_length - done)
        start = done + new - context  # the window keeps its last context - new tokens as a fixed prefix
        to_generate = (torch.arange(context, device=full.device) >= context - new).expand(B, context)
        tokens = process.prior(full[:, start:start + context], to_generate, generator)
        window = Canvas(tokens, to_generate.clone())
    return steps.output(full)


def _relay(steps: StepReporter, full: torch.Tensor, rows: torch.Tensor, start: int):
    """The window sampler's callback: its events become events on the whole (B, total_length) canvas."""
    base_nfe, base_rows = steps.nfe, steps.nfe_per_row.clone()

    def relay(event: StepEvent):
        context = event.tokens.shape[1]
        tokens = full.clone()
        tokens[rows, start:start + context] = event.tokens
        committed = torch.zeros_like(tokens, dtype=torch.bool)
        committed[rows, start:start + context] = event.committed
        confidence = None
        if event.confidence is not None:
            confidence = torch.zeros(tokens.shape, device=tokens.device)
            confidence[rows, start:start + context] = event.confidence
        steps.nfe = base_nfe + event.nfe
        steps.nfe_per_row[rows.cpu()] = base_rows[rows.cpu()] + event.nfe_per_row
        steps.report(tokens, committed, confidence)
        return steps.stopped[rows.cpu()]

    return relay
