"""The step-level sampler API's per-row state: what a running batch holds between two steps.

    state = sampler.start(network, process, canvas, generators)      # SamplerState
    state, event = sampler.step(state)                               # one step of every row not done

Every tensor has the batch first, so rows can leave (`select`) and join (`SamplerState.cat`) at step boundaries: a
server admits a request into a running batch and returns it when its row is `done`. Each row carries its own step
index and number of steps, its generator (its random numbers depend on nothing else) and the sampler's own
per-row extras; a row's tokens are the same whether it runs alone or beside others (float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F


@dataclass
class SamplerState:
    """tokens (B, L) long: the canvas now. to_generate (B, L) bool. key_valid (B, L) bool or None (no padding).
    positions (B, L) long or None (0..L-1). step (B,) long: steps each row has taken; num_steps (B,) long: steps it
    takes in all (its final step included where the sampler has one). done (B,) bool. generators: one per row (or
    None). nfe_per_row / tokens_computed (B,) long: calls each row took part in, and their query positions. extras:
    the sampler's own per-row tensors, batch first; those of shape (B, L, ...) are per position."""

    network: object
    process: object
    tokens: torch.Tensor
    to_generate: torch.Tensor
    key_valid: torch.Tensor | None
    positions: torch.Tensor | None
    step: torch.Tensor
    num_steps: torch.Tensor
    done: torch.Tensor
    generators: list | None
    nfe_per_row: torch.Tensor
    tokens_computed: torch.Tensor
    extras: dict = field(default_factory=dict)
    calls: int = 0  # network calls made by `step` on this state (the batch's NFE)
    events: int = 0  # steps taken by `step` on this state
    confidence: bool = True  # whether step events carry the committed tokens' probabilities

    @classmethod
    def begin(cls, network, process, canvas, generators, num_steps: int, extras: dict | None = None
              ) -> "SamplerState":
        """The state of a canvas (dlm.sampler.base.Canvas) before its first step: its tokens copied, every row at
        step 0 of `num_steps`, none done, no network call yet; `extras`: the sampler's own per-row tensors."""
        z = canvas.tokens.clone()
        B, device = z.shape[0], z.device
        positions = canvas.positions
        if positions is not None and positions.dim() == 1:
            positions = positions.expand(B, -1)
        zeros = lambda dtype: torch.zeros(B, dtype=dtype, device=device)  # noqa: E731
        return cls(network, process, z, canvas.to_generate, canvas.key_valid, positions, zeros(torch.long),
                   torch.full((B,), num_steps, device=device), zeros(torch.bool), generators,
                   zeros(torch.long).cpu(), zeros(torch.long).cpu(), extras or {})

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def canvas(self):
        """The state's canvas (dlm.sampler.base.Canvas) with its current tokens."""
        from dlm.sampler.base import Canvas

        return Canvas(self.tokens, self.to_generate, self.key_valid, self.positions)

    def rand(self, rows: torch.Tensor, shape: tuple[int, ...] = (), dtype=torch.float32,
             per_position: bool = False) -> torch.Tensor:
        """Uniforms (B_a, *shape) for the batch rows `rows` (B_a,) indices: with one generator per row, those rows
        draw from their own (per_position: shape is (L,), and a row draws only at its valid positions, as
        `rand_rows`); a shared generator (or None) draws for the whole batch, as a loop over every row did, and
        the rows are picked from it."""
        from dlm.sampler.base import generators_of, rand_rows

        device = self.tokens.device
        valid = self.key_valid if per_position else None
        if isinstance(self.generators, (list, tuple)):
            return rand_rows(generators_of(self.generators, rows.cpu()), (rows.numel(), *shape), device, dtype,
                             None if valid is None else valid[rows])
        return rand_rows(self.generators, (self.batch, *shape), device, dtype, valid)[rows]

    def forward(self, rows: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor | None = None,
                fed: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits (B_a, L, V) of one network call on the batch rows `rows` (B_a,) at the rows' times t (B,),
        counted (calls, nfe_per_row, tokens_computed). embeds (B, L, C) and fed (B,) bool: feedback inputs, used where
        a row has them; a row without (yet) is fed its tokens."""
        from dlm.sampler.base import forward_rows

        z, network, process = self.tokens, self.network, self.process
        inputs = None
        if embeds is not None and bool(fed[rows].any()):
            inputs = embeds if bool(fed[rows].all()) else \
                torch.where(fed[:, None, None], embeds, network.embed_tokens(z).to(embeds.dtype))
        if rows.numel() == self.batch:  # every row: the batch's call as it is
            raw = process.forward_logits(network, z, t, None, inputs, key_valid=self.key_valid,
                                         positions=self.positions)
        else:
            raw = forward_rows(process, network, z, t, inputs, rows, self.canvas())  # (B_a, L, V)
        self.calls += 1
        self.nfe_per_row[rows.cpu()] += 1
        self.tokens_computed[rows.cpu()] += self.length
        return raw

    def select(self, rows: torch.Tensor) -> "SamplerState":
        """The state of the batch rows `rows` (B_a,) indices, in that order (rows leaving the batch)."""
        rows = rows.to(self.tokens.device)
        cpu = rows.cpu()
        pick = lambda t: None if t is None else t[rows if t.device == rows.device else cpu]  # noqa: E731
        extras = {k: _select(v, rows) for k, v in self.extras.items()}
        return replace(self, tokens=self.tokens[rows], to_generate=self.to_generate[rows],
                       key_valid=pick(self.key_valid), positions=pick(self.positions), step=pick(self.step),
                       num_steps=pick(self.num_steps), done=pick(self.done),
                       generators=None if self.generators is None else [self.generators[i] for i in cpu.tolist()],
                       nfe_per_row=pick(self.nfe_per_row), tokens_computed=pick(self.tokens_computed), extras=extras)

    @staticmethod
    def cat(states: list["SamplerState"]) -> "SamplerState":
        """The rows of several states stacked, in order (rows joining a batch). Canvases of different lengths are
        left-padded to the longest with positions no query sees (key_valid False, nothing to generate), which changes
        no row's tokens: padding is never attended to and draws no random numbers."""
        L = max(s.length for s in states)
        first = states[0]
        if any(s.generators is None for s in states) and any(s.generators is not None for s in states):
            raise ValueError("states with and without per-row generators cannot be stacked")
        padded = [_left_pad(s, L) for s in states]
        valid = None
        if any(s.key_valid is not None for s in padded):
            valid = torch.cat([s.key_valid if s.key_valid is not None else torch.ones_like(s.to_generate)
                               for s in padded])
        positions = None
        if any(s.positions is not None for s in padded):
            positions = torch.cat([s.positions if s.positions is not None else
                                   torch.arange(L, device=s.tokens.device).expand(s.batch, L) for s in padded])
        keys = set().union(*(s.extras for s in padded))
        extras = {k: _cat([s.extras.get(k) for s in padded], [s.batch for s in padded]) for k in keys}
        cat = lambda name: torch.cat([getattr(s, name) for s in padded])  # noqa: E731
        return replace(first, calls=max(s.calls for s in states), events=max(s.events for s in states),
                       tokens=cat("tokens"), to_generate=cat("to_generate"), key_valid=valid,
                       positions=positions, step=cat("step"), num_steps=cat("num_steps"), done=cat("done"),
                       generators=None if first.generators is None else [g for s in padded for g in s.generators],
                       nfe_per_row=cat("nfe_per_row"), tokens_computed=cat("tokens_computed"), extras=extras)


def _select(value, rows):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)]
    if isinstance(value, list):
        return [value[i] for i in rows.cpu().tolist()]
    if hasattr(value, "select") and hasattr(type(value), "cat"):  # per-row rows of its own (e.g. a KV cache)
        return value.select(rows)
    return value  # shared by every row (e.g. a time grid)


def _cat(values, batches):
    """Stack one extra of several states; a state without a tensor extra (None: e.g. no logits yet) gets zeros,
    which its sampler never reads (its own flags say the values are not there). An object with `select` and a
    static `cat` (a KV cache of the rows) is stacked by its own `cat`."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if isinstance(present[0], torch.Tensor):
        like = present[0]
        return torch.cat([v if v is not None else like.new_zeros((b, *like.shape[1:])) for v, b in zip(values, batches)])
    if len(present) != len(values):
        raise ValueError("an extra is set in some states and not in others: they cannot be stacked")
    if isinstance(present[0], list):
        return [x for v in present for x in v]
    if hasattr(present[0], "select") and hasattr(type(present[0]), "cat"):
        return type(present[0]).cat(present)
    return present[0]


def _left_pad(state: SamplerState, L: int) -> SamplerState:
    """The state with its canvas left-padded to L positions (padding: invalid keys, nothing to generate)."""
    n = L - state.length
    if n == 0:
        return state
    pad = lambda t, value: F.pad(t, (n, 0), value=value)  # noqa: E731
    valid = state.key_valid if state.key_valid is not None else torch.ones_like(state.to_generate)
    positions = state.positions if state.positions is not None else \
        torch.arange(state.length, device=state.tokens.device).expand(state.batch, -1)
    extras = {}
    for k, v in state.extras.items():  # per-position extras (B, L, ...) are padded with zeros
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == state.length:
            v = F.pad(v, (0, 0) * (v.dim() - 2) + (n, 0))
        extras[k] = v
    return replace(state, tokens=pad(state.tokens, 0), to_generate=pad(state.to_generate, False),
                   key_valid=pad(valid, False), positions=pad(positions, 0), extras=extras)
