"""Block-by-block generation: BD3-LM with a KV cache, or any masked diffusion model without one.

The canvas is cut into blocks of `block_length` tokens at positions 0, b, 2b, ... For each block, left to right:
  1. clean tokens not yet in the KV cache (the previous block, or whole prompt blocks) are run once with
     `cache_update=True` under the block-causal rule, so every finished block is computed exactly once;
  2. the block's masks are denoised by an inner sampler (ancestral, cached ancestral, first-hitting, ...), whose
     network calls see the block (bidirectionally) and the cache — `BlockContext` is the process as the inner
     sampler sees it;
  3. stopping rules are checked per row: EOS generated, or the unigram entropy of the last `entropy_window`
     tokens below `stop_entropy` (degenerate repetition). A stopped row is padded with `fill_id`; the loop ends
     when every row has stopped.
`steps` is the step budget of the whole canvas: it is split over the blocks that have something to generate as
evenly as possible (the first `steps % n` blocks get one more), so it must be at least their number (an inner
sampler without a budget, first-hitting, takes one step per token whatever `steps` says).
Without a cache the same loop recomputes the clean prefix at every call (a block-causal process: block-causal
prefix mask; MDLM: plain bidirectional attention over prefix + block, i.e. semi-autoregressive MDLM). For a BD3 model
both give the same tokens for the same seed: the cached keys/values are exactly what the uncached call recomputes
(in fp32; under bf16 autocast the two paths round differently, so a token drawn near a probability boundary may
differ).

Past the training context a sliding window applies: when the window (default: the model's context) would overflow,
it restarts `window // 2` tokens (whole blocks) before the current block; with a cache those kept tokens are
re-encoded once with window-relative positions, so cached and uncached generation stay identical.
NFE counts every network call, the cache-filling passes included (each raises a step event committing nothing).
Rows stopped by the callback leave the batch (and the cache) and keep their tokens, masks included.

Step by step (`start` / `step`, dlm.sampler.state; `sample` is the base class's loop over them): each row
(`extras["rows"]`, a `_Row` each) keeps its own block grid, anchored on its own canvas (a longer row joining
left-pads the canvas: the grid moves with the row), its block and phase there (cache fill due, inner sampler
running), its window, its rows of the cache of finished blocks and its rows of the inner sampler's state. A step is,
for each row, a cache fill (one call, committing nothing) or one step of its inner sampler. Rows whose block, window
and cache end are the same share the fill call; rows that began a block together share one inner state (its calls
and random draws, as `sample`'s batch always did) and wait for each other at the block's end, where the stop rules
are checked; a row stopped by a rule runs on (and is padded at the end) while a row beside it in its block is still
running, and is done once none is. Rows that joined at other times are called separately. An inner sampler with
only a `sample` of its own (no step-level API, e.g. a user's one-file sampler) is run on each whole block by
`_sample_by_blocks`, the loop `sample` was before (same tokens, calls and events); `start` then refuses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dlm.data.entropy import unigram_entropy
from dlm.network import KVCache
from dlm.network.kv_cache import updates_cache as updates
from dlm.process.block_mask import generation_mask, prefix_mask
from dlm.sampler.base import Canvas, SampleOutput, Sampler, StepEvent, StepReporter, generators_of
from dlm.sampler.registry import SamplingConfig, make_sampler, register_sampler, sampler_spec
from dlm.sampler.state import SamplerState


@dataclass
class BlockwiseOutput(SampleOutput):
    lengths: list[int] = field(default_factory=list)  # per row: tokens before the `fill_id` padding after a stop
    stop_reasons: list[str] = field(default_factory=list)  # per row: "eos", "entropy", "length" or "callback"


class BlockContext:
    """The process as an inner sampler sees it while one block is denoised: everything is the process's (its
    contract, dlm.process.base) except `forward_logits`, which runs the block (B, b) together with the clean prefix
    of the window: from the KV cache, or `prefix` (B, P) with its `prefix_valid` (B, P) (False on left padding)
    and `prefix_positions` (B, P) (None: 0..P-1). The block's own key validity and positions come with the call
    (the inner sampler's canvas)."""

    def __init__(self, process, block_length: int, start: int, cache: KVCache | None, prefix: torch.Tensor | None,
                 prefix_valid: torch.Tensor | None = None, prefix_positions: torch.Tensor | None = None):
        self.process, self.block_length, self.start = process, block_length, start
        self.cache, self.prefix = cache, prefix  # exactly one of them is used
        self.prefix_valid, self.prefix_positions = prefix_valid, prefix_positions

    def select_rows(self, rows: torch.Tensor) -> "BlockContext":
        """The context of a sub-batch of the block's rows (rows (B_a,) indices): its cache or prefix rows."""
        pick = lambda t: None if t is None or t.dim() < 2 else t[rows]  # noqa: E731
        return BlockContext(self.process, self.block_length, self.start,
                            None if self.cache is None else self.cache.select(rows), pick(self.prefix),
                            pick(self.prefix_valid), pick(self.prefix_positions))

    def __getattr__(self, name):
        if name in ("process", "block_length", "start", "cache", "prefix", "prefix_valid", "prefix_positions"):
            raise AttributeError(name)  # not set yet: no recursion
        return getattr(self.process, name)

    def forward_logits(self, network, z, t, batch=None, inputs_embeds=None, *, key_valid=None, positions=None,
                       **forward) -> torch.Tensor:
        """Logits (B, b, V) of the block z (B, b); inputs_embeds (B, b, C) replace its token embeddings; key_valid
        (B, b) and positions (b,) / (B, b) (window-relative) of the block, None: all valid, start..start+b-1."""
        b = z.shape[1]
        if forward.pop("kv_cache", None) is not None or updates(forward.pop("cache_update", False)):
            raise ValueError("an inner sampler of the blockwise sampler cannot keep its own KV cache (the blockwise "
                             "sampler's cache holds the finished blocks); use it with cache='none'")
        inner_mask, logits_at = forward.pop("attn_mask", None), forward.pop("logits_at", None)  # over the block
        if inputs_embeds is not None:  # in the embedding's dtype, as token inputs are: both paths see the same numbers
            inputs_embeds = inputs_embeds.to(network.embed.weight.dtype)
        if positions is None:
            positions = torch.arange(self.start, self.start + b, device=z.device)
        if self.cache is not None:  # the block sees itself and every valid cached clean token
            mask = None if inner_mask is None else F.pad(inner_mask, (self.cache.length, 0), value=True)
            return self.process.forward_logits(network, z, t, None, inputs_embeds, key_valid=key_valid,
                                               positions=positions, kv_cache=self.cache, attn_mask=mask,
                                               logits_at=logits_at, **forward)
        P = self.prefix.shape[1]
        if inner_mask is not None:  # the inner sampler's mask over the block, within the whole (prefix + block) call
            forward["attn_mask"] = torch.ones((*inner_mask.shape[:-2], P + b, P + b), dtype=torch.bool,
                                              device=z.device)
            forward["attn_mask"][..., P:, P:] = inner_mask
        full = torch.cat((self.prefix, z), 1)  # (B, P + b)
        valid = None
        if key_valid is not None or self.prefix_valid is not None:
            ones = lambda n: torch.ones(z.shape[0], n, dtype=torch.bool, device=z.device)  # noqa: E731
            valid = torch.cat((ones(P) if self.prefix_valid is None else self.prefix_valid,
                               ones(b) if key_valid is None else key_valid), 1)
        prefix_positions = self.prefix_positions
        if prefix_positions is None:
            prefix_positions = torch.arange(P, device=z.device)
        if prefix_positions.dim() != positions.dim():
            prefix_positions, positions = (p.expand(z.shape[0], -1) for p in (prefix_positions, positions))
        where = torch.cat((prefix_positions, positions), -1)
        embeds = None
        if inputs_embeds is not None:
            embeds = torch.cat((network.embed(self.prefix), inputs_embeds), 1)
        if self.process.block_size is not None:  # a block-causal process: the prefix is seen block-causally
            mask = generation_mask(P, b, self.process.block_size, z.device)
            mask = mask if forward.get("attn_mask") is None else mask & forward.pop("attn_mask")
            logits = self.process.forward_logits(network, full, t, None, embeds, attn_mask=mask, key_valid=valid,
                                                 positions=where, **forward)
        else:  # MDLM: its own bidirectional attention over prefix + block (semi-autoregressive)
            logits = self.process.forward_logits(network, full, t, {}, embeds, key_valid=valid,
                                                 positions=None if valid is None and self.prefix_positions is None
                                                 else where, **forward)
        logits = logits[:, P:]
        if logits_at is None:
            return logits
        if isinstance(logits_at, slice):
            return logits[:, logits_at]
        return logits[logits_at]  # a bool (B, b) mask: (N, V)


@dataclass
class BlockwiseConfig(SamplingConfig):  # steps: the total over all blocks
    block_length: int | None = None
    inner_sampler: str = "ancestral_cache"
    kv_cache: bool = True
    window: int | None = None
    stop_at_eos: bool = False
    eos_id: int | None = None
    stop_entropy: float | None = None
    entropy_window: int = 256
    fill_id: int | None = None
    feedback: object = None  # soft-masking, for the inner sampler
    inner_options: dict | None = None  # the inner sampler's own options (e.g. renoise's max_denoising_steps)

    def __post_init__(self):
        super().__post_init__()
        if self.block_length is None:
            raise ValueError("the blockwise sampler needs block_length (tokens per block; a bd3lm model's own block "
                             "size)")
        if sampler_spec(self.inner_sampler).build is make_blockwise_sampler:
            raise ValueError(f"inner_sampler='{self.inner_sampler}' is not allowed; pick ancestral, ancestral_cache, "
                             "first_hitting or renoise")


class BlockwiseSampler(Sampler):
    name = "blockwise"
    takes_feedback = True  # passed to the inner sampler

    def __init__(self, inner: Sampler, block_length: int, kv_cache: bool = True, window: int | None = None,
                 stop_at_eos: bool = False, eos_id: int | None = None, stop_entropy: float | None = None,
                 entropy_window: int = 256, fill_id: int | None = None, steps: int | None = None):
        """inner: the sampler that denoises each block. steps: the step budget of the whole canvas, split over its
        blocks (default: the inner sampler's own `steps`, read as that total). window: the most tokens the network
        sees at once (default: its context). stop_entropy: stop a row when the unigram entropy (nats) of its last
        `entropy_window` tokens falls below it; must lie in (0, log(entropy_window)]. fill_id: written after a
        row stops (default: eos_id)."""
        if isinstance(inner, BlockwiseSampler):
            raise ValueError("the inner sampler of a blockwise sampler cannot itself be blockwise")
        if block_length < 1:
            raise ValueError(f"block_length={block_length} must be a positive integer")
        if steps is not None and steps < 1:
            raise ValueError(f"steps={steps} must be a positive integer")
        if entropy_window < 2:
            raise ValueError(f"entropy_window={entropy_window} must be at least 2 tokens")
        if stop_entropy is not None and not 0.0 < stop_entropy <= math.log(entropy_window):
            raise ValueError(f"stop_entropy={stop_entropy} is out of range: the unigram entropy of {entropy_window} "
                             f"tokens lies in [0, log {entropy_window} = {math.log(entropy_window):.3f}] nats, so the "
                             "threshold must be in (0, that]; the reference uses 4.0 for a 256-token window")
        if stop_at_eos and eos_id is None:
            raise ValueError("stop_at_eos=True needs eos_id (the tokenizer's EOS id)")
        fill_id = eos_id if fill_id is None else fill_id
        if (stop_at_eos or stop_entropy is not None) and fill_id is None:
            raise ValueError("stopping rules need fill_id (written after a row stops), e.g. the pad id")
        self.inner, self.block_length, self.kv_cache, self.window = inner, block_length, kv_cache, window
        self.stop_at_eos, self.eos_id, self.stop_entropy = stop_at_eos, eos_id, stop_entropy
        self.entropy_window, self.fill_id = entropy_window, fill_id
        self.steps = steps if steps is not None else getattr(inner, "steps", None)
        self.corruptions, self.takes_feedback = inner.corruptions, inner.takes_feedback  # what the inner can do

    def check_model(self, process, context: int) -> int:
        """The window length for this model; clear errors for models this loop cannot serve."""
        if process.autoregressive:
            raise ValueError("blockwise generation needs a diffusion model; an autoregressive model samples left to "
                             "right with its own KV cache (sampler 'autoregressive')")
        process.check_sampler(self)
        if self.kv_cache and "blockwise" not in process.exact_caches:
            raise ValueError(f"a KV-cached blockwise sampler needs a block-diffusion (bd3lm) model, not "
                             f"'{process.name}': its blocks attend bidirectionally, so a finished block's keys and "
                             "values change as later blocks arrive and cannot be reused exactly; use kv_cache=False "
                             "(semi-autoregressive blockwise generation)")
        window = self.window or context
        if window < self.block_length:
            raise ValueError(f"window={window} is shorter than one block ({self.block_length} tokens)")
        return window // self.block_length * self.block_length

    def inner_samplers(self, num_blocks: int) -> list[Sampler]:
        """One inner sampler per block to generate, the budget `steps` split as evenly as possible."""
        if self.steps is None or not hasattr(self.inner, "steps"):
            return [self.inner] * num_blocks
        if self.steps < num_blocks:
            raise ValueError(f"steps={self.steps} is fewer than the {num_blocks} blocks to generate: the blockwise "
                             f"sampler splits its step budget over the blocks (at least one each); give steps >= "
                             f"{num_blocks}")
        per, extra = divmod(self.steps, num_blocks)
        made = {}
        for k in {per, per + 1} if extra else {per}:
            made[k] = self.inner.with_steps(k)
        return [made[per + (i < extra)] for i in range(num_blocks)]

    def sample(self, network, process, canvas: Canvas, generator=None, callback=None) -> BlockwiseOutput:
        """canvas (B, N): BOS, prompt, and [MASK] where tokens are generated; N may exceed the context. The base
        class's loop over `start` / `step`; an inner sampler with only a `sample` of its own (no step-level API)
        is run on each whole block instead (`_sample_by_blocks`), with the same tokens, calls and events."""
        if type(self.inner).step is not Sampler.step:
            return super().sample(network, process, canvas, generator, callback)
        return self._sample_by_blocks(network, process, canvas, generator, callback)

    @torch.no_grad()
    def _sample_by_blocks(self, network, process, canvas: Canvas, generator=None, callback=None) -> BlockwiseOutput:
        """The block loop for an inner sampler without the step-level API: its `sample` denoises each block."""
        window = self.check_model(process, network.cfg.context)
        bs = self.block_length
        z, fixed = canvas.tokens.clone(), canvas.fixed
        B, N = z.shape
        if N > window and window < 2 * bs:
            raise ValueError(f"generating {N} tokens slides a window of {window} tokens, which must hold at least two "
                             f"blocks of {bs}; raise the window (the model's context) or lower the block size")
        keep = min(window // 2 // bs * bs, window - bs)  # tokens kept when the window slides
        starts = [s for s in range(0, N, bs) if not fixed[:, s:s + bs].all()]  # blocks with something to generate
        inners = dict(zip(starts, self.inner_samplers(len(starts))))
        cache = KVCache() if self.kv_cache else None
        ws = cached_to = 0  # window start; end of what the cache holds (absolute positions)
        alive = torch.ones(B, dtype=torch.bool)
        lengths, reasons = [N] * B, ["length"] * B
        steps = StepReporter(B, callback, N)
        rows = torch.arange(B, device=z.device)  # rows not stopped by the callback, in cache order
        key_valid, positions = canvas.key_valid, canvas.positions  # left padding, rotary positions (None: 0..N-1)

        def window_positions(rows, a, b):  # (B_a, b - a) rotary positions of canvas columns [a, b) in the window
            if positions is None:
                return torch.arange(a - ws, b - ws, device=z.device)
            where = positions if positions.dim() == 2 else positions.expand(B, -1)
            return (where[rows, a:b] - where[rows, ws:ws + 1]).clamp(min=0)  # pads (masked) clamp to 0

        for s in range(0, N, bs):
            if not alive.any():
                break
            e = min(s + bs, N)
            if e - ws > window:  # slide: restart the window `keep` tokens before this block
                ws = s - keep
                if cache is not None:
                    cache, cached_to = KVCache(), ws
            if s not in inners:
                continue  # prompt block: nothing to generate; it enters the cache with the next encode
            if cache is not None and cached_to < s:
                n_old, n_new = cached_to - ws, s - cached_to
                valid = None if key_valid is None else key_valid[rows, cached_to:s]
                process.forward_logits(network, z[rows, cached_to:s], None, None, attn_mask=prefix_mask(
                    n_old, n_new, bs, z.device), key_valid=valid, positions=window_positions(rows, cached_to, s),
                    kv_cache=cache, cache_update=True if valid is None else valid, logits_at=slice(0, 0))
                steps.called(rows, s - cached_to)
                cached_to = s
                steps.report(z, torch.zeros_like(z, dtype=torch.bool))
                rows, cache = self._leave(steps, rows, cache, alive, reasons)
                if rows.numel() == 0:
                    break
            prefix = None if cache is not None else z[rows, ws:s]
            ctx = BlockContext(process, bs, s - ws, cache, prefix,
                               None if key_valid is None or prefix is None else key_valid[rows, ws:s],
                               None if positions is None or prefix is None else window_positions(rows, ws, s))
            base_nfe, base_rows = steps.nfe, steps.nfe_per_row.clone()
            relay = None if callback is None else _Relay(steps, z, rows, s, e, base_nfe, base_rows)
            block = Canvas(z[rows, s:e], ~fixed[rows, s:e], None if key_valid is None else key_valid[rows, s:e],
                           None if positions is None else window_positions(rows, s, e))
            out = inners[s].sample(network, ctx, block, generators_of(generator, rows), relay)
            z[rows, s:e] = out.tokens
            steps.nfe = base_nfe + out.nfe
            steps.nfe_per_row[rows.cpu()] = base_rows[rows.cpu()] + out.nfe_per_row
            prefix_fed = 0 if prefix is None else prefix.shape[1]  # an uncached call feeds the prefix too
            if out.tokens_computed is not None:
                steps.tokens_computed[rows.cpu()] += out.tokens_computed + out.nfe_per_row * prefix_fed
            rows, cache = self._leave(steps, rows, cache, alive, reasons)
            self._check_stops_batch(z, fixed, s, e, alive, lengths, reasons)
        tokens = z.clone()  # (B, N) whatever the stops, so batches of samples stack
        for row in range(B):
            if lengths[row] < N:  # padding after a stop
                tokens[row, lengths[row]:] = self.fill_id
        return steps.output(tokens, BlockwiseOutput, lengths=lengths, stop_reasons=reasons)

    @staticmethod
    def _leave(steps, rows, cache, alive, reasons):
        """Rows the callback stopped leave the batch and the cache; they keep their tokens (masks included)."""
        keep = steps.live()[rows.cpu()].to(rows.device)  # (B_a,)
        if bool(keep.all()):
            return rows, cache
        for row in rows[~keep].tolist():
            alive[row], reasons[row] = False, "callback"
        if cache is not None:
            cache = cache.select(keep.nonzero().squeeze(1))
        return rows[keep], cache

    def _check_stops_batch(self, z, fixed, s, e, alive, lengths, reasons) -> None:
        for row in torch.nonzero(alive).flatten().tolist():
            if self.stop_at_eos:
                hits = torch.nonzero((z[row, s:e] == self.eos_id) & ~fixed[row, s:e]).flatten()
                if hits.numel():
                    alive[row], lengths[row], reasons[row] = False, s + int(hits[0]) + 1, "eos"
                    continue
            if self.stop_entropy is not None and e >= self.entropy_window:
                if unigram_entropy(z[row, e - self.entropy_window:e]) < self.stop_entropy:
                    alive[row], lengths[row], reasons[row] = False, e, "entropy"

    @torch.no_grad()
    def start(self, network, process, canvas: Canvas, generator=None) -> SamplerState:
        """canvas (B, N): BOS, prompt, and [MASK] where tokens are generated; N may exceed the context. Every row
        starts at block 0 of its own canvas, with an empty cache; its plan (the inner sampler of each block, None
        where no row of this canvas has anything to generate) is fixed here."""
        if type(self.inner).step is Sampler.step:
            raise NotImplementedError(f"the blockwise sampler steps its inner sampler, and {type(self.inner).__name__} "
                                      "has no step-level API (start/step); use its `sample` (the whole loop)")
        window = self.check_model(process, network.cfg.context)
        bs = self.block_length
        B, N = canvas.shape
        if N > window and window < 2 * bs:
            raise ValueError(f"generating {N} tokens slides a window of {window} tokens, which must hold at least two "
                             f"blocks of {bs}; raise the window (the model's context) or lower the block size")
        fixed = canvas.fixed
        starts = [s for s in range(0, N, bs) if not fixed[:, s:s + bs].all()]  # blocks with something to generate
        inners = dict(zip(starts, self.inner_samplers(len(starts))))
        plan = tuple(inners.get(s) for s in range(0, N, bs))
        rows = [_Row(N, plan) for _ in range(B)]
        state = SamplerState.begin(network, process, canvas, generator, 0, {"rows": rows})
        state.extras["window"] = window  # shared by every row
        self._advance(state, begin=False)
        return state

    @torch.no_grad()
    def step(self, state: SamplerState) -> tuple[SamplerState, StepEvent]:
        """One step of every row not done: a row whose block needs the cache filled makes that call (a step that
        commits nothing), a row inside its block takes one step of its inner sampler. Rows sharing a block span,
        window and cache share the calls (and rows that began a block together step it together, waiting for each
        other at its end); others are called separately."""
        z = state.tokens
        self._advance(state, begin=True)
        committed = torch.zeros_like(z, dtype=torch.bool)
        confidence = torch.zeros(z.shape, device=z.device) if state.confidence else None
        rows_ = state.extras["rows"]
        active = [r for r in range(state.batch) if not bool(state.done[r]) and rows_[r].phase in (_FILL, _INNER)]
        fills = {}
        for r in active:
            if rows_[r].phase == _FILL:
                fills.setdefault(self._span(state, r), []).append(r)
        for span, group in fills.items():
            self._fill(state, group, span)
        inners = {}
        for r in active:
            if rows_[r].phase == _INNER:
                inners.setdefault(id(rows_[r].inner[0]), []).append(r)
        scored = [self._inner_step(state, group, committed, confidence) for group in inners.values()]
        if not any(scored):  # a step of cache fills only (or inner steps without confidences): none, as before
            confidence = None
        state.step = state.step + torch.tensor([r in active for r in range(state.batch)], device=z.device).long()
        self._advance(state, begin=False)
        padded = [r for r, row in enumerate(rows_) if row.phase == _DONE and row.length < row.N and not row.padded]
        tokens = z.clone() if padded else z  # the event shows the step's tokens; rows done after a stop are padded
        for r in padded:
            z[r, state.length - rows_[r].N + rows_[r].length:] = self.fill_id
            rows_[r].padded = True
        event = StepEvent(state.events, tokens, committed, confidence, state.calls, state.nfe_per_row.clone())
        state.events += 1
        return state, event

    def _span(self, state, r) -> tuple[int, int, int, int]:
        """Row r's block [start, end), window start and cache end, in canvas columns of the state."""
        row, bs = state.extras["rows"][r], self.block_length
        o = state.length - row.N  # the row's grid origin: the columns left-padded in front of its canvas
        s = row.block * bs
        return o + s, o + min(s + bs, row.N), o + row.ws, o + row.cached_to

    def _positions(self, state, rows: torch.Tensor, a: int, b: int, ws: int) -> torch.Tensor:
        """(B_a, b - a) (or (b - a,)) rotary positions of columns [a, b) in the window starting at column ws."""
        if state.positions is None:
            return torch.arange(a - ws, b - ws, device=state.tokens.device)
        return (state.positions[rows, a:b] - state.positions[rows, ws:ws + 1]).clamp(min=0)  # pads (masked) clamp to 0

    def _group_cache(self, state, group: list[int]) -> KVCache:
        """The KV cache of the rows `group` (all with the same window and cache end): the one they share when they
        are all its rows, in order; else theirs picked (and stacked)."""
        entries = [state.extras["rows"][r].cache for r in group]
        if all(e is None or not e[0].layers for e in entries):  # nothing cached yet
            return KVCache()
        first = entries[0][0]
        if all(e[0] is first for e in entries) and [e[1] for e in entries] == list(range(first.batch)):
            return first
        device = state.tokens.device
        parts = {}
        for e in entries:
            parts.setdefault(id(e[0]), [e[0], []])[1].append(e[1])
        if len(parts) == 1:
            return first.select(torch.tensor([e[1] for e in entries], device=device))
        return KVCache.cat([e[0].select(torch.tensor([e[1]], device=device)) for e in entries])

    def _fill(self, state, group: list[int], span) -> None:
        """One call feeding the clean tokens between the cache's end and the block of the rows `group` into their
        cache (block-causally), which they then share."""
        s, _, ws, cached_to = span
        network, process, z = state.network, state.process, state.tokens
        rows = torch.tensor(group, device=z.device)
        cache = self._group_cache(state, group)
        valid = None if state.key_valid is None else state.key_valid[rows, cached_to:s]
        process.forward_logits(network, z[rows, cached_to:s], None, None, attn_mask=prefix_mask(
            cached_to - ws, s - cached_to, self.block_length, z.device), key_valid=valid,
            positions=self._positions(state, rows, cached_to, s, ws), kv_cache=cache,
            cache_update=True if valid is None else valid, logits_at=slice(0, 0))
        state.calls += 1
        state.nfe_per_row[rows.cpu()] += 1
        state.tokens_computed[rows.cpu()] += s - cached_to
        for i, r in enumerate(group):
            row = state.extras["rows"][r]
            row.cache, row.cached_to, row.phase = (cache, i), row.cached_to + (s - cached_to), _READY

    def _begin_inner(self, state, group: list[int]) -> None:
        """The inner sampler's state for the block of the rows `group` (same span, window and cache)."""
        s, e, ws, _ = self._span(state, group[0])
        z, rows_ = state.tokens, state.extras["rows"]
        rows = torch.tensor(group, device=z.device)
        row = rows_[group[0]]
        cache = None if not self.kv_cache else self._group_cache(state, group)
        prefix = None if cache is not None else z[rows, ws:s]
        key_valid, positions = state.key_valid, state.positions
        ctx = BlockContext(state.process, self.block_length, s - ws, cache, prefix,
                           None if key_valid is None or prefix is None else key_valid[rows, ws:s],
                           None if positions is None or prefix is None else self._positions(state, rows, ws, s, ws))
        block = Canvas(z[rows, s:e], state.to_generate[rows, s:e], None if key_valid is None else key_valid[rows, s:e],
                       None if positions is None else self._positions(state, rows, s, e, ws))
        inner = row.plan[row.block].start(state.network, ctx, block, generators_of(state.generators, rows))
        inner.confidence = state.confidence
        holder = [inner, 0 if prefix is None else prefix.shape[1]]  # the state, and the prefix each call feeds
        for i, r in enumerate(group):
            rows_[r].inner, rows_[r].inner_index, rows_[r].phase = holder, i, _INNER
            if cache is not None:
                rows_[r].cache = (cache, i)

    def _inner_step(self, state, group: list[int], committed, confidence) -> bool:
        """One step of the inner state the rows `group` share (its rows gone or done sit it out); its tokens, calls
        and commits go to the outer canvas. Returns whether its event had confidences."""
        rows_, z = state.extras["rows"], state.tokens
        holder = rows_[group[0]].inner
        inner, prefix_fed = holder
        index = torch.tensor([rows_[r].inner_index for r in group])
        present = torch.zeros(inner.batch, dtype=torch.bool)
        present[index] = True
        inner.done = inner.done | ~present.to(inner.done.device)  # rows stopped or gone leave the inner batch
        calls, per_row, computed = inner.calls, inner.nfe_per_row.clone(), inner.tokens_computed.clone()
        inner, event = rows_[group[0]].plan[rows_[group[0]].block].step(inner)
        holder[0] = inner
        s, e, _, _ = self._span(state, group[0])
        rows = torch.tensor(group, device=z.device)
        at = index.to(z.device)
        z[rows, s:e] = inner.tokens[at]
        committed[rows, s:e] = event.committed[at]
        scored = confidence is not None and event.confidence is not None
        if scored:
            confidence[rows, s:e] = event.confidence[at]
        state.calls += inner.calls - calls
        new_calls = (inner.nfe_per_row - per_row)[index]
        state.nfe_per_row[rows.cpu()] += new_calls
        state.tokens_computed[rows.cpu()] += (inner.tokens_computed - computed)[index] + new_calls * prefix_fed
        return scored

    def _advance(self, state, begin: bool) -> None:
        """Move rows through their blocks up to the next thing a step does: a block whose inner sampler is through
        for every row that began it ends (stop rules checked), then the next blocks begin: the window slides,
        prompt blocks are skipped, a cache fill is due (_FILL) or the inner sampler may start (_READY; it starts at
        a step's beginning, `begin`, after the callback has seen the last step). A row is done after its last
        block, or once it has stopped and no running row shares its block."""
        rows_, done = state.extras["rows"], state.done
        while True:
            moved = False
            holders = {}
            for r, row in enumerate(rows_):
                if row.phase == _INNER and not bool(done[r]):
                    holders.setdefault(id(row.inner[0]), []).append(r)
            for group in holders.values():
                inner = rows_[group[0]].inner[0]
                mine = torch.tensor([rows_[r].inner_index for r in group])
                if bool(inner.done.cpu()[mine].all()):  # the block is over for these rows
                    for r in group:
                        self._end_block(state, r)
                    moved = True
            for r, row in enumerate(rows_):
                if row.phase == _BEGIN and not bool(done[r]):
                    self._begin_block(state, r)
            if begin:
                ready = {}
                for r, row in enumerate(rows_):
                    if row.phase == _READY and not bool(done[r]):
                        ready.setdefault(self._span(state, r) + (id(row.plan[row.block]),), []).append(r)
                for group in ready.values():
                    self._begin_inner(state, group)
                    moved = True
            if not moved:
                return

    def _end_block(self, state, r: int) -> None:
        """Row r's block is over: its stop rules are checked and it moves to the next block."""
        row = state.extras["rows"][r]
        row.inner, row.phase = None, _BEGIN
        if row.alive:
            o, s = state.length - row.N, row.block * self.block_length
            self._check_stops(state.tokens[r, o:], state.to_generate[r, o:], row, s, min(s + self.block_length, row.N))
        row.block += 1

    def _begin_block(self, state, r: int) -> None:
        """Row r at the start of a block: done (after its last block, or stopped with nobody running beside it),
        or the window slides, and prompt blocks are skipped, up to a block to fill the cache for or to sample."""
        rows_, bs, window = state.extras["rows"], self.block_length, state.extras["window"]
        row = rows_[r]
        keep = min(window // 2 // bs * bs, window - bs)  # tokens kept when the window slides
        while True:
            s = row.block * bs
            if s >= row.N or not row.alive and not any(
                    other.alive and not bool(state.done[q]) and self._span(state, q)[0] == self._span(state, r)[0]
                    for q, other in enumerate(rows_)):
                self._finish_row(state, r)
                return
            e = min(s + bs, row.N)
            if e - row.ws > window:  # slide: restart the window `keep` tokens before this block
                row.ws = s - keep
                if self.kv_cache:
                    row.cache, row.cached_to = None, row.ws
            if row.plan[row.block] is None:  # prompt block: nothing to generate; it enters the cache with the next fill
                row.block += 1
                continue
            row.phase = _FILL if self.kv_cache and row.cached_to < s else _READY
            return

    def _finish_row(self, state, r: int) -> None:
        """Row r is done: its cache and inner rows are let go (a stopped row is padded with fill_id after the step)."""
        row = state.extras["rows"][r]
        state.done[r] = True
        row.phase, row.cache, row.inner = _DONE, None, None

    def _check_stops(self, z, to_generate, row, s: int, e: int) -> None:
        """Stop rules on the row's canvas z (N,) after its block [s, e)."""
        if self.stop_at_eos:
            hits = torch.nonzero((z[s:e] == self.eos_id) & to_generate[s:e]).flatten()
            if hits.numel():
                row.alive, row.length, row.reason = False, s + int(hits[0]) + 1, "eos"
                return
        if self.stop_entropy is not None and e >= self.entropy_window:
            if unigram_entropy(z[e - self.entropy_window:e]) < self.stop_entropy:
                row.alive, row.length, row.reason = False, e, "entropy"

    def output(self, state, stopped: torch.Tensor) -> BlockwiseOutput:
        """`sample`'s result: tokens (B, N) padded with fill_id after each row's stop, its length and stop reason
        ("callback" for rows the callback stopped)."""
        tokens, rows_ = state.tokens, state.extras["rows"]
        for r, row in enumerate(rows_):
            if row.length < row.N:
                tokens[r, state.length - row.N + row.length:] = self.fill_id
            if bool(stopped[r]):
                row.reason = "callback"
        return BlockwiseOutput(tokens, state.calls, state.nfe_per_row.cpu(), stopped, state.tokens_computed.cpu(),
                               lengths=[row.length for row in rows_], stop_reasons=[row.reason for row in rows_])


class _Relay:
    """The inner sampler's callback: its events on the block's rows become the outer canvas's events."""

    def __init__(self, steps, z, rows, start, end, base_nfe, base_rows):
        self.steps, self.z, self.rows, self.start, self.end = steps, z, rows, start, end
        self.base_nfe, self.base_rows = base_nfe, base_rows

    def __call__(self, event):
        steps, rows, (s, e) = self.steps, self.rows, (self.start, self.end)
        tokens = self.z.clone()
        tokens[rows, s:e] = event.tokens
        committed = torch.zeros_like(tokens, dtype=torch.bool)
        committed[rows, s:e] = event.committed
        confidence = None
        if event.confidence is not None:
            confidence = torch.zeros(tokens.shape, device=tokens.device)
            confidence[rows, s:e] = event.confidence
        steps.nfe = self.base_nfe + event.nfe
        steps.nfe_per_row[rows.cpu()] = self.base_rows[rows.cpu()] + event.nfe_per_row
        steps.report(tokens, committed, confidence)
        return steps.stopped[rows.cpu()]


_BEGIN, _FILL, _READY, _INNER, _DONE = range(5)  # a row's phase within its block


class _Row:
    """One row's place in the blockwise loop (extras["rows"], one per row; positions are the row's own canvas
    columns, its grid anchored at its first column): canvas length N, the inner sampler of each block (`plan`),
    its block, phase, window start, cache end, its cache (the shared KVCache and its row there), its inner state
    ([the shared SamplerState, prefix length fed per call] and its row there), and its stop (alive, length, reason)."""

    def __init__(self, N: int, plan: tuple):
        self.N, self.plan = N, plan
        self.block, self.phase, self.ws, self.cached_to = 0, _BEGIN, 0, 0
        self.cache, self.inner, self.inner_index = None, None, 0
        self.alive, self.length, self.reason, self.padded = True, N, "length", False


@register_sampler("blockwise", BlockwiseConfig,
                  description="block by block, left to right, with an inner sampler (bd3lm with a KV cache, or MDLM)")
def make_blockwise_sampler(steps: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                           block_length: int | None = None, inner_sampler: str = "ancestral_cache",
                           kv_cache: bool = True, window: int | None = None, stop_at_eos: bool = False,
                           eos_id: int | None = None, stop_entropy: float | None = None, entropy_window: int = 256,
                           fill_id: int | None = None, feedback=None,
                           inner_options: dict | None = None) -> BlockwiseSampler:
    """The registry's "blockwise": `inner_sampler` (any registered name: ancestral, ancestral_cache,
    first_hitting, renoise, ...) with `steps` steps over all blocks; `feedback` (soft-masking) goes to the inner
    sampler, and so do `inner_options` (its own options, e.g. renoise's max_denoising_steps)."""
    spec = sampler_spec(inner_sampler)
    common = {"steps": steps, "temperature": temperature, "top_p": top_p}
    inner = make_sampler(inner_sampler, **{**{k: v for k, v in common.items() if k in spec.options},
                                           **(inner_options or {})},
                         **({} if feedback is None else {"feedback": feedback}))
    return BlockwiseSampler(inner, block_length, kv_cache, window, stop_at_eos, eos_id, stop_entropy, entropy_window,
                            fill_id, steps=steps if hasattr(inner, "steps") else None)
