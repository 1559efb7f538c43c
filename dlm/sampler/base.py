"""What every sampler shares: the canvas, the result, the per-step event, the sampler interface and float64
categorical sampling.

A sampler denoises a `Canvas` with a network and a process:

    sampler.sample(network, process, canvas, generator=None, callback=None) -> SampleOutput

`generator`: a list of one torch.Generator per row (what `DiffusionLM.generate` passes, each seeded from its
request's seed: a row's tokens are then the same alone, in any batch and beside prompts of any length), or one
shared generator (or None). Every random draw goes through `rand_rows`.

and talks to the process only through its contract (dlm.process.base): `corruption`, `prior`, `is_noise`,
`forward_logits`, `denoise`, `reverse_probs`, `alpha`, `time_of_mask_rate`, `network_time`, `time_conditioning`, `sampling_eps`,
`block_size`, `exact_caches`, `autoregressive`, `mask_id`, `check_sampler`.

Callbacks. `callback(StepEvent)` is called once after every step of the sampler's update rule, after that step's
commits. A step makes at most one network call: the events whose `nfe` grew are exactly the network calls, one
each. A step that makes no call (a cached ancestral step reusing the last logits, the final argmax from cached
logits, whatever it commits) raises its event with `nfe` unchanged. (Through the step-level API, a batch whose rows
sit in different blocks — rows that joined later — makes one call per block in a step of the LLaDA sampler;
`sample` starts every row together, so there it is one.) The final argmax of MDLM-style samplers is a
step when something is left to fill; the blockwise sampler's cache-filling pass is a step that commits nothing.
The callback may return True (stop every row), a (B,) bool tensor (stop those rows) or None/False (continue).
A stopped row keeps its current tokens (noise may be left in them), takes part in no further network call and
is flagged in `SampleOutput.stopped`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from dlm.process.feedback import InputFeedback  # noqa: F401  (the type of samplers' feedback=; defined with the process)

@dataclass
class Canvas:
    """What a sampler denoises.

    tokens (B, L) long: the given tokens, and the process's prior (e.g. [MASK]) at the positions to generate.
    to_generate (B, L) bool: positions the sampler fills; every other position is given and never changes.
    key_valid (B, L) bool or None: False on left padding, which is never attended to (None: no padding).
    positions (L,) or (B, L) long or None: rotary positions (None: 0..L-1).
    """

    tokens: torch.Tensor
    to_generate: torch.Tensor
    key_valid: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    def __post_init__(self):
        if self.tokens.dim() != 2 or self.to_generate.shape != self.tokens.shape:
            raise ValueError(f"a canvas needs tokens (B, L) and to_generate of the same shape, got "
                             f"{tuple(self.tokens.shape)} and {tuple(self.to_generate.shape)}")
        if self.to_generate.dtype != torch.bool:
            raise ValueError("to_generate must be a bool tensor")

    @property
    def fixed(self) -> torch.Tensor:
        """(B, L) bool: the given positions."""
        return ~self.to_generate

    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape

    def select(self, rows: torch.Tensor) -> "Canvas":
        """The canvas of a sub-batch: rows (B_a,) indices into the batch."""
        pick = lambda t: t if t is None or t.dim() < 2 else t[rows]  # noqa: E731
        return Canvas(self.tokens[rows], self.to_generate[rows], pick(self.key_valid), pick(self.positions))

    def with_tokens(self, tokens: torch.Tensor) -> "Canvas":
        return Canvas(tokens, self.to_generate, self.key_valid, self.positions)

    @classmethod
    def from_fixed(cls, tokens: torch.Tensor, fixed: torch.Tensor, process=None,
                   generator: torch.Generator | None = None) -> "Canvas":
        """A canvas of tokens (B, L) whose `fixed` (B, L) bool positions are given; with `process`, the other
        positions are filled from its prior (else they must already hold it)."""
        to_generate = ~fixed.bool()
        if process is not None:
            tokens = process.prior(tokens, to_generate, generator)
        return cls(tokens, to_generate)

    @classmethod
    def left_padded(cls, prompts: list[list[int]], gen_length: int, process, pad_id: int | None = None,
                    device=None, generator: torch.Generator | None = None, align: int | None = None) -> "Canvas":
        """Prompts (token id lists, lengths may differ) left-padded to the longest, then `gen_length` positions to
        generate: (B, P + gen_length). Padding is never attended to and each row's rotary positions start at 0 on
        its first real token, so a prompt's continuation does not depend on its padding. align: pad P up to a
        multiple of it, so the generated part starts on a block boundary (a process whose blocks start right after
        the prompt: `blocks_after_prompt`)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("give at least one prompt, each with at least one token (e.g. BOS)")
        if gen_length < 1:
            raise ValueError(f"gen_length={gen_length} must be positive")
        P = max(len(p) for p in prompts)
        if align:
            P = -(-P // align) * align
        pad = (process.mask_id if process.mask_id is not None else 0) if pad_id is None else pad_id
        x = torch.full((len(prompts), P + gen_length), pad, dtype=torch.long)
        key_valid = torch.ones_like(x, dtype=torch.bool)
        for i, p in enumerate(prompts):
            x[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
            key_valid[i, :P - len(p)] = False
        to_generate = (torch.arange(P + gen_length) >= P).expand_as(x).clone()
        x, key_valid, to_generate = x.to(device), key_valid.to(device), to_generate.to(device)
        x = process.prior(x, to_generate, generator)
        if bool(key_valid.all()):
            return cls(x, to_generate)
        positions = (key_valid.long().cumsum(1) - 1).clamp(min=0)  # (B, L): 0 on each row's first real token
        return cls(x, to_generate, key_valid, positions)


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B, L) the canvas after sampling (noise left only in rows the callback stopped)
    nfe: int  # network calls (forward passes over the batch)
    nfe_per_row: torch.Tensor  # (B,) long: the calls each row took part in
    stopped: torch.Tensor  # (B,) bool: rows stopped by the callback
    # (B,) long: query positions the network computed for each row, summed over its calls — a partial call (a KV
    # cached step, a block) counts the positions it fed, so nfe_per_row counts calls and this their size
    tokens_computed: torch.Tensor | None = None

    @property
    def tokens_per_nfe(self) -> float:
        """Tokens per network call of each row (1.0 = one token per call), over the batch: all canvas positions,
        given ones included (a caller that knows the generated count divides it by nfe_per_row.sum())."""
        return self.tokens.numel() / max(int(self.nfe_per_row.sum()), 1)


@dataclass
class StepEvent:
    """What a callback sees after a step (see the module docstring for when events are raised).

    step: index of this event within the sample call (0-based). tokens (B, L): the canvas after this step's
    commits — a view that later steps change: clone it to keep it. committed (B, L) bool: positions that received
    their token at this step (final, except for remasking samplers such as ReMDM). confidence (B, L) float32 or
    None: at committed positions, the probability of the chosen token under x_theta (None where the sampler does
    not have it). nfe: network calls so far; nfe_per_row (B,): the calls each row took part in so far.
    """

    step: int
    tokens: torch.Tensor
    committed: torch.Tensor
    confidence: torch.Tensor | None
    nfe: int
    nfe_per_row: torch.Tensor


Callback = Callable[[StepEvent], "bool | torch.Tensor | None"]


def stop_mask(result, batch: int) -> torch.Tensor:
    """A callback's answer as (B,) bool on the CPU: True stops every row, a (B,) bool tensor those rows."""
    if result is None or result is False:
        return torch.zeros(batch, dtype=torch.bool)
    if result is True:
        return torch.ones(batch, dtype=torch.bool)
    if isinstance(result, torch.Tensor) and result.shape == (batch,):
        return result.bool().cpu()
    raise ValueError(f"a sampling callback returns None, a bool or a ({batch},) bool tensor, not {result!r}")


class StepReporter:
    """A sample call's bookkeeping: network calls (total and per row), events, and rows stopped by the callback."""

    def __init__(self, batch: int, callback: Callback | None, width: int = 0):
        self.callback = callback
        self.nfe, self.events = 0, 0
        self.width = width  # query positions of a full call (the canvas length)
        self.nfe_per_row = torch.zeros(batch, dtype=torch.long)
        self.tokens_computed = torch.zeros(batch, dtype=torch.long)
        self.stopped = torch.zeros(batch, dtype=torch.bool)

    def live(self, device=None) -> torch.Tensor:
        """(B,) bool: rows not stopped by the callback."""
        return (~self.stopped).to(device)

    @property
    def all_stopped(self) -> bool:
        return bool(self.stopped.all())

    def called(self, rows: torch.Tensor | None = None, tokens: int | None = None) -> None:
        """Count one network call; rows: the batch rows it ran on (indices or (B,) bool; default: the live ones);
        tokens: the query positions it fed each of them (default: `width`, the whole canvas)."""
        self.nfe += 1
        rows = self.live() if rows is None else rows.cpu()
        self.nfe_per_row[rows] += 1
        self.tokens_computed[rows] += self.width if tokens is None else tokens

    def report(self, tokens: torch.Tensor, committed: torch.Tensor, confidence: torch.Tensor | None = None) -> None:
        """Raise one event (a no-op without a callback) and apply its answer."""
        if self.callback is not None:
            event = StepEvent(self.events, tokens, committed, confidence, self.nfe, self.nfe_per_row.clone())
            self.stopped |= stop_mask(self.callback(event), len(self.stopped))
        self.events += 1

    def output(self, tokens: torch.Tensor, cls=SampleOutput, **extra) -> SampleOutput:
        return cls(tokens, self.nfe, self.nfe_per_row, self.stopped.clone(), tokens_computed=self.tokens_computed,
                   **extra)


class Sampler:
    """A sampler denoises a canvas: `sample(network, process, canvas, generator, callback) -> SampleOutput`.

    Class attributes: `name`; `corruptions`, the kinds of corruption it can denoise; `autoregressive`, True only
    for left-to-right decoding; `takes_feedback`, whether it accepts soft-masking `feedback=`. A new sampler is
    one file: subclass, decorate with `dlm.sampler.registry.register_sampler(name, ConfigDataclass)`.
    """

    name: ClassVar[str] = "base"
    corruptions: ClassVar[tuple[str, ...]] = ("absorbing",)
    autoregressive: ClassVar[bool] = False
    takes_feedback: ClassVar[bool] = False

    config = None  # the config dataclass instance it was built from (dlm.sampler.registry), when it was
    config_class: ClassVar[type | None] = None  # the dataclass of its options (set by register_sampler)

    def __init__(self, *args, **options):
        """A sampler is built from its config: `AncestralSampler(8, cache=True)` is
        `AncestralSampler.from_config(AncestralConfig(8, cache=True))` (arguments in the config's field order), so
        the config's `__post_init__` checks the values and no sampler repeats its fields in an `__init__`."""
        if self.config_class is None:
            if args or options:
                raise TypeError(f"{type(self).__name__} has no config dataclass (register it with register_sampler) "
                                "and takes no arguments")
            return
        self._configure(self.config_class(*args, **options))

    def _configure(self, config) -> None:
        """The config's fields as attributes (`self.steps`, ...; shallow: feedback modules stay) and the config as
        `self.config`."""
        self.__dict__.update({f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
        self.config = config

    @classmethod
    def from_config(cls, config) -> "Sampler":
        """The sampler of a config dataclass instance (what the registry calls). A sampler class without its own
        `__init__` gets the config's fields as attributes (`self.steps`, ...) and the config as `self.config`;
        one with an `__init__` is called with the fields as keywords."""
        if cls.__init__ is Sampler.__init__:
            sampler = cls.__new__(cls)
            sampler._configure(config)
            return sampler
        sampler = cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
        sampler.config = config
        return sampler

    def sample(self, network, process, canvas: Canvas, generator: torch.Generator | None = None,
               callback: Callback | None = None) -> SampleOutput:
        """The whole loop. A sampler with the step-level API (`start` and `step`) gets it from here: start, then
        step until every row is done, each event passed to the callback (rows it stops are done, tokens kept)."""
        if type(self).step is Sampler.step:
            raise NotImplementedError(f"{type(self).__name__} implements neither sample nor start/step")
        state = self.start(network, process, canvas, generator)
        state.confidence = callback is not None
        stopped = torch.zeros(state.batch, dtype=torch.bool)
        while not bool(state.done.all()):
            state, event = self.step(state)
            if callback is not None:
                stop = stop_mask(callback(event), state.batch)
                stopped |= stop & ~state.done.cpu()
                state.done |= stop.to(state.done.device)
        return self.output(state, stopped)

    def output(self, state, stopped: torch.Tensor) -> SampleOutput:
        """`sample`'s result from the state after the last step; stopped (B,) bool: rows the callback stopped."""
        return SampleOutput(state.tokens, state.calls, state.nfe_per_row.cpu(), stopped, state.tokens_computed.cpu())

    def start(self, network, process, canvas: Canvas, generator=None):
        """The step-level API: the per-row state (dlm.sampler.state.SamplerState) of a canvas before its first step.
        generator: one per row (a list) for batch invariance, or one shared."""
        raise NotImplementedError(f"{type(self).__name__} has no step-level API yet")

    def step(self, state):
        """One step of every row of `state` not done: (the state after it, its StepEvent). Rows may be at different
        steps; a row's tokens depend only on its own state and generator."""
        raise NotImplementedError(f"{type(self).__name__} has no step-level API yet")

    def with_steps(self, steps: int) -> "Sampler":
        """A copy that takes `steps` steps (the blockwise sampler splits its budget over blocks with this)."""
        if steps < 1:
            raise ValueError(f"steps={steps} must be a positive integer")
        new = copy.copy(self)
        new.steps = steps
        if self.config is not None and "steps" in {f.name for f in dataclasses.fields(self.config)}:
            new.config = dataclasses.replace(self.config, steps=steps)
        return new


def masked_fraction(process, z: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """(B,) float: per row, the fraction of its generated positions (generated (B, L) bool) that are still noise."""
    return (process.is_noise(z) & generated).sum(1).float() / generated.sum(1).clamp(min=1).float()


def forward_live(process, network, z, t, inputs_embeds, live: torch.Tensor, canvas: Canvas | None = None) -> torch.Tensor:
    """Raw logits (B, L, V) of one call on the live rows (live (B,) bool) only; other rows' logits are zeros and
    must not be read. `canvas`: the canvas being denoised, whose `key_valid` (left padding, never attended to) and
    `positions` go to `process.forward_logits` (None: an unpadded canvas). With every row live this is exactly
    `process.forward_logits` on the batch."""
    key_valid = None if canvas is None else canvas.key_valid
    positions = None if canvas is None else canvas.positions
    if bool(live.all()):
        return process.forward_logits(network, z, t, None, inputs_embeds, key_valid=key_valid, positions=positions)
    rows = live.nonzero().squeeze(1)
    part = forward_rows(process, network, z, t, inputs_embeds, rows, canvas)
    out = part.new_zeros((z.shape[0], *part.shape[1:]))
    out[rows] = part
    return out


def forward_rows(process, network, z, t, inputs_embeds, rows: torch.Tensor, canvas: Canvas | None = None
                 ) -> torch.Tensor:
    """Raw logits (B_a, L, V) of one call on the batch rows `rows` (B_a,) indices only (a sampler that keeps its
    other rows' logits writes these into place, with no full-batch tensor)."""
    key_valid = None if canvas is None else canvas.key_valid
    positions = None if canvas is None else canvas.positions
    if hasattr(process, "select_rows"):  # a process holding per-row context (the blockwise sampler's BlockContext)
        process = process.select_rows(rows)
    pick = lambda x: x if x is None or (x is positions and x.dim() < 2) else x[rows]  # noqa: E731
    return process.forward_logits(network, z[rows], pick(t), None, pick(inputs_embeds), key_valid=pick(key_valid),
                                  positions=pick(positions))


def fill_remaining_masks(network, process, z, to_generate, t_final: float, reporter: StepReporter,
                         inputs_embeds=None, logits=None, canvas: Canvas | None = None) -> None:
    """The last step of MDLM-style samplers: every noise position of the live rows still in z (B, L) among
    to_generate takes the argmax of x_theta, in place, and the step is reported.

    `logits`: the raw network logits (B, L, V), reused when still valid for z (a cached sampler), else one
    network call is made at time t_final.
    """
    live = reporter.live(z.device)
    remaining = process.is_noise(z) & to_generate & live[:, None]
    if not remaining.any():
        return
    if logits is None:
        t = torch.full((z.shape[0],), float(t_final), device=z.device)
        logits = forward_live(process, network, z, t, inputs_embeds, live, canvas)
        reporter.called()
    x_theta = process.denoise(logits[remaining])  # (n, V)
    tokens = x_theta.argmax(-1)
    z[remaining] = tokens
    confidence = torch.zeros(z.shape, device=z.device)
    confidence[remaining] = x_theta.softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    reporter.report(z, remaining, confidence)


Generators = "torch.Generator | list[torch.Generator] | None"


def generators_of(generator, rows: torch.Tensor):
    """The generators of the batch rows `rows` (B_a,) when `generator` is a list of one per row; a shared generator
    (or None) as it is."""
    if isinstance(generator, (list, tuple)):
        return [generator[i] for i in rows.tolist()]
    return generator


def rand_rows(generator, shape: tuple[int, ...], device=None, dtype=torch.float32,
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """Uniforms of `shape` (B, ...): every random draw of a sampler goes through here.

    generator: a list of one torch.Generator per row (batch invariance: each row draws from its own, so its numbers
    are the same alone and in any batch), or one shared generator (or None), which draws the whole tensor at once.
    valid (B, L) bool, with shape[1] == L: with per-row generators a row draws only at its valid positions (its
    left padding draws nothing and reads 0), so its numbers do not depend on how much padding the batch gives it.
    """
    if not isinstance(generator, (list, tuple)):
        return torch.rand(shape, generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} per-row generators for a batch of {shape[0]} rows")
    if valid is None or bool(valid.all()):
        return torch.stack([torch.rand(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])
    out = torch.zeros(shape, device=device, dtype=dtype)
    for b, g in enumerate(generator):
        keep = valid[b]
        out[b, keep] = torch.rand((int(keep.sum()), *shape[2:]), generator=g, device=device, dtype=dtype)
    return out


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Draw one token per row of logits (N, V) by inverse-CDF sampling in float64.

    u (N,) float64 uniforms. Float64 matters: Gumbel-max in float32 behaves like a lowered temperature
    (Zheng et al. 2024). temperature 0 is argmax. top_p < 1 keeps the smallest set of tokens whose
    probability reaches top_p (nucleus), renormalised.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)  # (N, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < top_p  # the top token is always kept
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep_sorted)
    cdf = probs.cumsum(-1)  # (N, V)
    target = (u.clamp_min(1e-12) * cdf[:, -1]).unsqueeze(-1)  # (N, 1); > 0, so zero-probability tokens are never hit
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_max(logits.shape[-1] - 1)


def chosen_probability(x_theta: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(N,) float32: the probability of tokens (N,) under the x_theta logits (N, V)."""
    return x_theta.float().softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
