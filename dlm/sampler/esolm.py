"""Eso-LM's sampler (Sahoo, Yang et al., arXiv 2506.01928): a diffusion phase, then an autoregressive phase, with
one KV cache that is exact in both for the causal variant.

The schedule is fixed before the first call, per row, as an explicit list of position sets (`position_schedule`):
each position to generate draws u ~ U(0, 1) and is clean at time t iff u < alpha_t = alpha0 (1 - t). The positions
with u < alpha0 are the diffusion positions; they are grouped into sets, one set per step:

    binomial       T = `steps` steps on the grid t_i = 1 - i/T: set i holds the positions with
                   alpha_{t_i} <= u < alpha_{t_{i+1}}, empty sets dropped. Its sizes are exactly
                   n_i ~ Binomial(remaining, (alpha_s - alpha_t) / (1 - alpha_t)), the positions a uniformly random
                   assignment (the paper's "first sum n_i entries of a random permutation").
    first_hitting  one diffusion position per step, in the order of their unmasking times t = 1 - u / alpha0.
    fixed          `parallelism` positions per step, in that order.
    subcontext     sets of `parallelism` positions far apart: the diffusion positions in left-to-right order,
                   dealt round-robin into ceil(n / parallelism) sets (set j: the j-th, (j+m)-th, ... positions),
                   the sets in a random order.
The positions with u >= alpha0 follow one per step, left to right (the sequential phase). Inside a set the masks
are in a random order (ascending u). `alpha0` defaults to the process's alpha0 for evaluation (`alpha0_eval`).

The sampled sequence, in the order sigma it is written, is: the clean context (the given tokens: prompt, infill
context, in natural order), then each set in turn. The network sees it as Eso-LM was trained: tokens sorted by
sigma, each keeping its rotary position, under the process's attention rule (`attention_rule`):

    causal               (Eso-LM "(B)", v4's "Eso-LM"): causal attention on the sorted sequence. Exact with a KV
                         cache: step k feeds only the set decoded at step k - 1 (now clean; at step 0 the given
                         tokens) followed by the masks of set k, causal inside the chunk, over the cache; the clean
                         tokens' keys and values are appended, the masks' are not (the one-step lag).
    clean_bidirectional  ("(A)"): clean tokens see each other both ways, masks see every clean token and the masks
                         before them. Clean tokens' keys change as tokens are added: recomputed every step.
    bidirectional        any other masked diffusion process (MDLM, BD3-LM inside its blocks): the whole canvas,
                         masks included, with the process's own attention; the sets only choose what is committed.
Without the cache (`kv_cache=False`, rule (A), or a time-conditioned network, whose keys depend on t) every step
runs the sorted sequence of the clean tokens and the current set. Cached and uncached give the same tokens for a
seed (float32).

Step by step (dlm.sampler.state): each row keeps its schedule (`when` (B, L): the step at which a position is
decoded, 1-based, 0 for context; `frac`: its order inside its set; `t_at`: the step's time), its step and its rows
of the KV cache (`CacheRows`), so rows join and leave a running batch with their own schedule and cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dlm.network import KVCache
from dlm.sampler.base import (Canvas, InputFeedback, Sampler, StepEvent, chosen_probability, generators_of,
                              masked_fraction, rand_rows, sample_tokens)
from dlm.sampler.registry import check_steps, check_temperature, check_top_p, register_sampler
from dlm.sampler.state import SamplerState

SCHEDULES = ("binomial", "first_hitting", "fixed", "subcontext")
RULES = ("causal", "clean_bidirectional", "bidirectional")


@dataclass
class EsoLMSamplerConfig:
    steps: int = 64  # T of the binomial schedule's diffusion phase (the other schedules do not read it)
    schedule: str = "binomial"  # binomial | first_hitting | fixed | subcontext
    parallelism: int = 4  # positions per diffusion step of the fixed and subcontext schedules
    alpha0: float | None = None  # share of the tokens made by diffusion; None: the process's alpha0 for evaluation
    kv_cache: bool = True  # use the KV cache where it is exact (causal rule, no time conditioning)
    temperature: float = 1.0
    top_p: float = 1.0
    feedback: InputFeedback | None = None  # soft-masking: the bidirectional rule only (a plain masked diffusion model)

    def __post_init__(self):
        check_steps(self.steps)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if isinstance(self.parallelism, bool) or not isinstance(self.parallelism, int) or self.parallelism < 1:
            raise ValueError(f"parallelism={self.parallelism!r} must be a positive integer")
        if self.alpha0 is not None and not (isinstance(self.alpha0, (int, float)) and 0.0 <= self.alpha0 <= 1.0):
            raise ValueError(f"alpha0={self.alpha0!r} must be in [0, 1] (or None: the process's alpha0 for evaluation)")
        check_temperature(self.temperature)
        check_top_p(self.top_p)


def attention_rule(process) -> str:
    """How `process`'s network was trained to attend (see the module docstring): an Eso-LM process's `attention`
    ("causal" or "clean_bidirectional"), else "bidirectional" (a plain masked diffusion process)."""
    rule = getattr(process, "attention", None)
    return rule if isinstance(rule, str) and rule in RULES else "bidirectional"


def process_alpha0(process) -> float:
    """The diffusion share a process is sampled with by default: its `alpha0_eval`, else its `alpha0`, else 1 (a
    plain masked diffusion model: everything by diffusion)."""
    for name in ("alpha0_eval", "alpha0"):
        value = getattr(process, name, None)
        if value is not None:
            return float(value)
    return 1.0


def position_schedule(u: torch.Tensor, open_: torch.Tensor, alpha0: float, schedule: str = "binomial",
                      steps: int = 64, parallelism: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row's schedule. u (L,) float64 uniforms, open_ (L,) bool: the positions to generate.

    Returns when (L,) long: the 1-based step that decodes each position (0: context, never decoded); frac (L,)
    float64 in [0, 1): its order inside its step's set (context: its column / L, i.e. natural order); t_at (L,)
    float64: the time of its step (1 - i/T on the binomial grid; the first unmasking time of the set otherwise;
    0 in the sequential phase)."""
    L = u.numel()
    cols = torch.arange(L, device=u.device)
    when = torch.zeros(L, dtype=torch.long, device=u.device)
    frac = cols.double() / L
    t_at = torch.zeros(L, dtype=torch.float64, device=u.device)
    diffusion = open_ & (u < alpha0)
    d = diffusion.nonzero().squeeze(1)  # (n,) diffusion positions, left to right
    ud = u[d]
    n = d.numel()
    if n:
        if schedule == "binomial":
            bucket = (ud / alpha0 * steps).floor().long().clamp(max=steps - 1)  # grid interval of its unmask time
            grid, step = torch.unique(bucket, return_inverse=True)  # nonempty intervals, in time order
            t_set = 1.0 - grid.double() / steps
        else:
            rank = torch.empty_like(d)
            rank[ud.argsort()] = torch.arange(n, device=u.device)  # order of the unmasking times
            if schedule == "first_hitting":
                step = rank
            elif schedule == "fixed":
                step = rank // parallelism
            elif schedule == "subcontext":
                m = math.ceil(n / parallelism)
                deal = torch.arange(n, device=u.device) % m  # round-robin over the left-to-right positions
                order = torch.empty(m, dtype=torch.long, device=u.device)
                order[ud[:m].argsort()] = torch.arange(m, device=u.device)  # sets in the order of their first u
                step = order[deal]
            else:
                raise ValueError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
            first = torch.full((int(step.max()) + 1,), 2.0, dtype=torch.float64, device=u.device)
            first = first.scatter_reduce(0, step, ud, "amin")  # each set's first unmasking u
            t_set = 1.0 - first / alpha0
        when[d] = step + 1
        frac[d] = ud
        t_at[d] = t_set[step]
    sequential = (open_ & ~diffusion).nonzero().squeeze(1)
    start = int(when.max())
    when[sequential] = start + 1 + torch.arange(sequential.numel(), device=u.device)
    frac[sequential] = 0.0
    return when, frac, t_at


@dataclass
class CacheRows:
    """The KV cache of the rows of a state where `held` (B,) bool is True, in order (a row leaves it when done)."""

    cache: KVCache
    held: torch.Tensor

    def select(self, rows: torch.Tensor) -> "CacheRows":
        """The rows `rows` (B_a,) indices (SamplerState.select)."""
        rows = rows.to(self.held.device)
        index = self.held.long().cumsum(0) - 1  # batch row -> its cache row
        return CacheRows(self.cache.select(index[rows][self.held[rows]]), self.held[rows])

    def keep(self, rows: torch.Tensor) -> "CacheRows":
        """Only the batch rows where `rows` (B,) bool is True (a subset of the held ones)."""
        if bool((rows == self.held).all()):
            return self
        index = (self.held.long().cumsum(0) - 1)[rows]
        return CacheRows(self.cache.select(index), rows.clone())

    @staticmethod
    def cat(parts: list["CacheRows"]) -> "CacheRows":
        """The rows of several states stacked (SamplerState.cat); a cache still empty (a row that has not made its
        first call) gets zero-length layers, so `KVCache.cat` keeps its rows (left-padded with invalid keys)."""
        full = next((p.cache for p in parts if p.cache.layers), None)
        caches = []
        for p in parts:
            c = p.cache
            if full is not None and not c.layers:
                b = int(p.held.sum())
                c = KVCache([(k.new_zeros((b, k.shape[1], 0, k.shape[3])), v.new_zeros((b, v.shape[1], 0, v.shape[3])))
                             for k, v in full.layers], capacity=c.capacity)
            caches.append(c)
        cache = KVCache.cat(caches) if full is not None else KVCache(capacity=max(p.cache.capacity for p in parts))
        return CacheRows(cache, torch.cat([p.held for p in parts]))


def _first(mask: torch.Tensor, key: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) column indices: per row, the columns where mask (B, L) is True in ascending `key` (B, L), then
    arbitrary columns once a row has fewer (the caller marks them invalid)."""
    return key.masked_fill(~mask, math.inf).topk(n, dim=1, largest=False, sorted=True).indices


@register_sampler("esolm", EsoLMSamplerConfig,
                  description="Eso-LM: diffusion sets, then left to right, one KV cache exact in both phases")
class EsoLMSampler(Sampler):
    name = "esolm"
    takes_feedback = True

    @torch.no_grad()
    def start(self, network, process, canvas: Canvas, generator=None) -> SamplerState:
        """Each row's schedule, drawn from its own generator (one uniform per valid position)."""
        process.check_sampler(self)
        rule = attention_rule(process)
        if rule != "bidirectional" and getattr(network, "prediction", "same_position") == "shifted":
            raise ValueError("the Eso-LM sampler feeds tokens in their sorted order; a network with shifted "
                             "predictions (position i reads i - 1) cannot be run that way")
        if rule != "bidirectional" and self.feedback is not None:
            raise ValueError(f"input feedback ({getattr(self.feedback, 'label', 'feedback')}) is for a model that sees "
                             f"the whole canvas; this process's attention rule is '{rule}': sample it without "
                             "feedback (feedback=False, --no-feedback)")
        alpha0 = process_alpha0(process) if self.alpha0 is None else float(self.alpha0)
        z = canvas.tokens
        B, L = z.shape
        state = SamplerState.begin(network, process, canvas, generator, 0)
        u = state.rand(torch.arange(B, device=z.device), (L,), torch.float64, per_position=True)  # (B, L)
        open_ = process.is_noise(z) & canvas.to_generate
        parts = [position_schedule(u[b], open_[b], alpha0, self.schedule, self.steps, self.parallelism)
                 for b in range(B)]
        when, frac, t_at = (torch.stack([p[i] for p in parts]) for i in range(3))
        state.num_steps = when.max(1).values
        state.done = state.num_steps == 0
        cached = self.kv_cache and rule == "causal" and not process.time_conditioning
        held = torch.ones(B, dtype=torch.bool, device=z.device)
        state.extras = {"when": when, "frac": frac, "t_at": t_at,
                        "cache": CacheRows(KVCache(capacity=L + 8), held) if cached else None,
                        "embeds": None, "fed": torch.zeros(B, dtype=torch.bool, device=z.device)}
        return state

    @torch.no_grad()
    def step(self, state: SamplerState) -> tuple[SamplerState, StepEvent]:
        """Step k of every row not done: one call, then the masks of its set k + 1 take tokens drawn from x_theta."""
        process, z = state.process, state.tokens
        B, L = z.shape
        device = z.device
        active = ~state.done
        rows = active.nonzero().squeeze(1)  # (B_a,)
        k = state.step[rows]
        when, frac = state.extras["when"][rows], state.extras["frac"][rows]
        cur = when == (k + 1)[:, None]  # (B_a, L): this step's set
        C = cur.sum(1)
        cur_cols = _first(cur, frac, int(C.max()))  # (B_a, C_max), in the set's order
        cur_valid = torch.arange(cur_cols.shape[1], device=device) < C[:, None]
        t = state.extras["t_at"][rows].masked_fill(~cur, -math.inf).amax(1).float()  # (B_a,)
        rule = attention_rule(process)
        if state.extras["cache"] is not None:
            logits = self._cached_call(state, active, rows, k, cur, cur_cols, cur_valid)
        elif rule == "bidirectional":
            t_all = torch.zeros(B, device=device)
            t_all[rows] = t
            raw = state.forward(rows, t_all, state.extras["embeds"], state.extras["fed"])  # (B_a, L, V)
            a = torch.arange(rows.numel(), device=device)[:, None].expand_as(cur_cols)
            logits = raw[a[cur_valid], cur_cols[cur_valid]]  # (N, V)
        else:
            logits = self._sorted_call(state, rows, k, cur, t, rule)
        x_theta = process.denoise(logits)  # (N, V), the rows' sets in order
        u = rand_rows(generators_of(state.generators, rows.cpu()), tuple(cur_cols.shape), device, torch.float64,
                      cur_valid if isinstance(state.generators, (list, tuple)) else None)[cur_valid]
        new = sample_tokens(x_theta, u, self.temperature, self.top_p)
        a = torch.arange(rows.numel(), device=device)[:, None].expand_as(cur_cols)[cur_valid]
        at = cur_cols[cur_valid]
        z[rows[a], at] = new
        if self.feedback is not None and rule == "bidirectional":
            self._feed(state, active, rows, raw)
        committed = torch.zeros(B, L, dtype=torch.bool, device=device)
        committed[rows[a], at] = True
        confidence = None
        if state.confidence:
            confidence = torch.zeros(B, L, device=device)
            confidence[rows[a], at] = chosen_probability(x_theta, new)
        state.step = state.step + active.long()
        state.done = state.done | (state.step >= state.num_steps)
        event = StepEvent(state.events, z, committed, confidence, state.calls, state.nfe_per_row.clone())
        state.events += 1
        return state, event

    def _feed(self, state: SamplerState, active: torch.Tensor, rows: torch.Tensor, raw: torch.Tensor) -> None:
        """The feedback's inputs for the rows' next call, from this call's raw logits (B_a, L, V) (as the
        first-hitting sampler)."""
        z, B, L = state.tokens, state.batch, state.length
        embeds, fed = state.extras["embeds"], state.extras["fed"]
        masks_left = masked_fraction(state.process, z[rows], state.to_generate[rows])  # (B_a,)
        given = self.feedback(state.network, z[rows], raw, ~state.to_generate[rows], masks_left)
        if given is None:  # plain tokens next time
            fed = fed & ~active
        elif rows.numel() == B:
            embeds, fed = given, fed | active
        else:
            embeds = given.new_zeros((B, L, given.shape[-1])) if embeds is None else embeds
            embeds[rows] = given.to(embeds.dtype)
            fed = fed | active
        state.extras["embeds"], state.extras["fed"] = embeds, fed

    def _positions(self, state: SamplerState, rows: torch.Tensor) -> torch.Tensor:
        """(B_a, L) rotary positions of the rows' canvas columns."""
        if state.positions is not None:
            return state.positions[rows]
        return torch.arange(state.length, device=state.tokens.device).expand(rows.numel(), -1)

    def _valid(self, state: SamplerState, rows: torch.Tensor) -> torch.Tensor:
        if state.key_valid is not None:
            return state.key_valid[rows]
        return torch.ones(rows.numel(), state.length, dtype=torch.bool, device=state.tokens.device)

    def _count(self, state: SamplerState, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        state.calls += 1
        state.nfe_per_row[rows.cpu()] += 1
        state.tokens_computed[rows.cpu()] += tokens.cpu()

    def _cached_call(self, state, active, rows, k, cur, cur_cols, cur_valid) -> torch.Tensor:
        """Logits (N, V) at the rows' current masks, feeding only the set decoded last step (the given tokens at
        step 0) and the current masks: chunk (B_a, P + C) = [previous set ; current set], causal inside the chunk,
        over the cache; the previous set's keys are appended (the one-step lag)."""
        held = state.extras["cache"].keep(active)  # rows done leave the cache
        cache, device = held.cache, state.tokens.device
        when, frac = state.extras["when"][rows], state.extras["frac"][rows]
        prev = (when == k[:, None]) & self._valid(state, rows)  # (B_a, L): given at step 0, else the last set
        P = prev.sum(1)
        prev_cols = _first(prev, frac, int(P.max()))  # (B_a, P_max)
        prev_valid = torch.arange(prev_cols.shape[1], device=device) < P[:, None]
        cols = torch.cat((prev_cols, cur_cols), 1)  # (B_a, T)
        valid = torch.cat((prev_valid, cur_valid), 1)
        Pm, T = prev_cols.shape[1], cols.shape[1]
        cached = cache.length
        causal = torch.ones(T, cached + T, dtype=torch.bool, device=device).tril(cached)  # (T, S)
        at = torch.zeros_like(valid)
        at[:, Pm:] = cur_valid
        # The whole chunk is appended (in place: the cache reserves the canvas's length), then the masks' columns (its
        # last C_max) are cropped off, to be overwritten by the next append: no copy of the cache per call. A row whose
        # previous set is smaller than others' gets its padding columns appended as keys nobody sees.
        crop = T - Pm
        if Pm == 0:
            update, crop = False, 0
        elif bool(prev_valid.all()):
            update = True
        else:
            update = torch.cat((prev_valid, torch.zeros_like(cur_valid)), 1)  # (B_a, T): valid per row
        logits = state.process.forward_logits(
            state.network, state.tokens[rows].gather(1, cols), None, positions=self._positions(state, rows).gather(1, cols),
            key_valid=valid, attn_mask=causal, kv_cache=cache, cache_update=update, logits_at=at)  # (N, V)
        if crop:
            cache.crop(cache.length - crop)
        state.extras["cache"] = held
        self._count(state, rows, P + cur.sum(1))
        return logits

    def _sorted_call(self, state, rows, k, cur, t, rule) -> torch.Tensor:
        """Logits (N, V) at the rows' current masks, recomputing the sorted sequence [clean tokens in sigma order ;
        current set] under the causal rule or rule (A) (clean tokens bidirectional, masks causal)."""
        device = state.tokens.device
        when, frac = state.extras["when"][rows], state.extras["frac"][rows]
        seen = (when <= (k + 1)[:, None]) & self._valid(state, rows)  # context, decoded and current
        n = seen.sum(1)
        cols = _first(seen, when.double() + frac, int(n.max()))  # (B_a, T): sigma order
        T = cols.shape[1]
        j = torch.arange(T, device=device)
        valid = j < n[:, None]
        clean = (n - cur.sum(1))[:, None]  # (B_a, 1)
        at = valid & (j >= clean)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask = causal if rule == "causal" else causal[None] | (j[None, None, :] < clean[:, :, None])  # (B_a, T, T)
        if mask.dim() == 3:
            mask = mask[:, None]
        logits = state.process.forward_logits(
            state.network, state.tokens[rows].gather(1, cols), t, None, positions=self._positions(state, rows).gather(1, cols),
            key_valid=valid, attn_mask=mask, logits_at=at)
        self._count(state, rows, n)
        return logits
