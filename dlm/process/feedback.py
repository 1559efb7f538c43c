"""Feedback: the process decides the network's next input from its previous prediction (a hook of the process
contract, dlm/process/base.py). Soft-masking (dlm/softmask/) and self-conditioning (dlm/process/self_conditioning.py)
are feedbacks.

An `InputFeedback` turns a prediction into input embeddings (B, L, C) for the next network call, built from the
network's embedding matrix `network.embed.weight` (V, C), which the network contract exposes:

  sampling   `feedback(network, z, logits, fixed, masks_left)`: after each step, from that step's raw logits
             (B, L, V), the inputs of the next call on the canvas z (B, L), or None (plain token ids). Samplers take
             it as `feedback=`.
  training   `feedback.train_inputs(network, z, rows, where)`: the second pass's inputs on z_t (B, L) from a first
             pass's raw logits `rows` (N, V) at the positions `where` (B, L) (row-major): the process's
             `feedback_positions(z, batch)`, the noise positions of z_t for an absorbing process, every corruptible
             position for a uniform or mixed one; differentiable in the feedback's own parameters (the first pass
             runs without gradients: its prediction is an input, not a target).

A process names its feedback in both places: `process.feedback(**overrides)` is what a model trained with it is
sampled with (`DiffusionLM.generate` attaches it unless told otherwise; None: plain inputs) and
`process.loss_feedback(generator, device, always)` what a training batch's loss pass gets (None: one plain pass).
`second_pass_inputs` is the training hook's one implementation: it asks the process, runs the first pass and
builds the second pass's inputs; `MaskedDiffusion.loss` calls it after drawing z_t.

Combining. Every feedback's inputs are E[z] + delta (its `offset`; zero where it does not act). `combine(a, b, ...)`
feeds E[z] + delta_a + delta_b + ..., computed as a's own inputs plus the others' offsets: soft-masking followed by
self-conditioning gives the soft-mask embedding plus the self-conditioning projection.
"""

from __future__ import annotations

import torch


class InputFeedback:
    """Turns one step's predictions into the next network call's input embeddings.

    `__call__(network, z, logits, fixed, masks_left)` gets the canvas z (B, L) after this step's commits, this
    step's raw logits (B, L, V), the fixed positions (B, L) and masks_left (B,): each row's fraction of its
    generated positions still masked (`dlm.sampler.base.masked_fraction`; per row, so a row's inputs never depend on
    the other rows of the batch), and returns input embeddings (B, L, C) for the next call, or None for plain token
    inputs. Samplers that leave masks between steps accept `feedback=`; with it, a step that commits nothing still
    changes the inputs, so cached samplers cannot skip a call. `train_inputs` is the training side (module docstring).
    `label` / `short` name it in reports ("soft-masking" / "SM").
    """

    label: str = "feedback"
    short: str = "FB"

    def __call__(self, network, z, logits, fixed, masks_left):
        raise NotImplementedError

    def offset(self, network, z, logits, fixed, masks_left) -> torch.Tensor | None:
        """What it adds to the plain inputs E[z] (B, L, C), or None (nothing); by default its inputs minus E[z]."""
        embeds = self(network, z, logits, fixed, masks_left)
        return None if embeds is None else embeds - network.embed_tokens(z).to(embeds.dtype)

    def train_inputs(self, network, z: torch.Tensor, rows: torch.Tensor, where: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Training: the second pass's inputs (B, L, C) on z (B, L) from the first pass's logits rows (N, V) at the
        positions `where` (B, L) bool (row-major; None: the [MASK] positions of z, an absorbing process's)."""
        raise NotImplementedError(f"{type(self).__name__} is a sampling-only feedback: it cannot be trained with")

    def train_offset(self, network, z: torch.Tensor, rows: torch.Tensor, where: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """`train_inputs` minus E[z] (B, L, C)."""
        embeds = self.train_inputs(network, z, rows, where)
        return embeds - network.embed_tokens(z).to(embeds.dtype)


class CombinedFeedback(InputFeedback):
    """Several feedbacks at once: E[z] + the sum of their offsets, computed as the first one's inputs plus the
    others' offsets (each part in its own arithmetic, so the first part's embeddings are kept exactly)."""

    def __init__(self, parts: list[InputFeedback]):
        if len(parts) < 2:
            raise ValueError("a CombinedFeedback needs at least two feedbacks; use the one feedback itself")
        self.parts = list(parts)
        self.label = " + ".join(p.label for p in self.parts)
        self.short = "+".join(p.short for p in self.parts)

    def __call__(self, network, z, logits, fixed, masks_left):
        out = self.parts[0](network, z, logits, fixed, masks_left)
        for part in self.parts[1:]:
            delta = part.offset(network, z, logits, fixed, masks_left)
            if delta is None:
                continue
            if out is None:
                out = network.embed_tokens(z).to(delta.dtype)
            out = out + delta.to(out.dtype)
        return out

    def train_inputs(self, network, z, rows, where=None):
        extra = () if where is None else (where,)  # a feedback written before `where` takes three arguments
        out = self.parts[0].train_inputs(network, z, rows, *extra)
        for part in self.parts[1:]:
            out = out + part.train_offset(network, z, rows, *extra).to(out.dtype)
        return out


def combine(*feedbacks: InputFeedback | None) -> InputFeedback | None:
    """The feedbacks given (None ones left out) as one: None, the one itself, or a `CombinedFeedback` in this
    order (nested combinations are flattened)."""
    parts = []
    for f in feedbacks:
        if isinstance(f, CombinedFeedback):
            parts += f.parts
        elif f is not None:
            parts.append(f)
    return None if not parts else parts[0] if len(parts) == 1 else CombinedFeedback(parts)


def coin(generator, device, p: float) -> bool:
    """True with probability p (a training batch gets a feedback): 1 draws nothing, 0 draws nothing, else one
    uniform from `generator` (one generator; a list of one per row uses its first)."""
    if p >= 1.0:
        return True
    if p <= 0.0:
        return False
    g = generator[0] if isinstance(generator, (list, tuple)) else generator
    return bool(torch.rand((), generator=g, device=device) < p)


def first_pass_rows(process, network, z: torch.Tensor, t: torch.Tensor, batch: dict) -> torch.Tensor:
    """The first pass: raw logits (N, V) at the positions the feedback acts on,
    `process.feedback_positions(z, batch)` (the noise positions of z (B, L) for an absorbing process; every
    corruptible one for a process whose noise cannot be told by looking), row-major, without gradients."""
    with torch.no_grad():
        return process.forward_logits(network, z, t, batch, logits_at=process.feedback_positions(z, batch))


def second_pass_inputs(process, network, batch: dict, z: torch.Tensor, t: torch.Tensor, generator,
                       always: bool = False) -> torch.Tensor | None:
    """The training hook: the inputs (B, L, C) of the loss pass on z_t (B, L) at times t (B,), or None (the plain
    pass on token ids). Asks `process.loss_feedback(generator, device, always)` (which draws its coin, after z_t);
    with a feedback, runs the first pass and returns `feedback.train_inputs`. always: every feedback applied (the
    bound used for evaluation). The denoiser then depends on z_t only, so its NELBO is still a bound."""
    feedback = process.loss_feedback(generator, z.device, always)
    if feedback is None:
        return None
    rows = first_pass_rows(process, network, z, t, batch)
    if process.corruption == "absorbing":  # the rows are at the [MASK] positions: every feedback's own default
        return feedback.train_inputs(network, z, rows)
    return feedback.train_inputs(network, z, rows, process.feedback_positions(z, batch))
