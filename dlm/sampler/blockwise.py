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
from dlm.sampler.base import Canvas, SampleOutput, Sampler, StepReporter, generators_of
from dlm.sampler.registry import SamplingConfig, make_sampler, register_sampler, sampler_spec


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

    def __post_init__(self):
        super().__post_init__()
        if self.block_length is None:
            raise ValueError("the blockwise sampler needs block_length (tokens per block; a bd3lm model's own block "
                             "size)")
        if sampler_spec(self.inner_sampler).build is make_blockwise_sampler:
            raise ValueError(f"inner_sampler='{self.inner_sampler}' is not allowed; pick ancestral, ancestral_cache or "
                             "first_hitting")


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

    @torch.no_grad()
    def sample(self, network, process, canvas: Canvas, generator=None, callback=None) -> BlockwiseOutput:
        """canvas (B, N): BOS, prompt, and [MASK] where tokens are generated; N may exceed the context."""
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
            self._check_stops(z, fixed, s, e, alive, lengths, reasons)
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

    def _check_stops(self, z, fixed, s, e, alive, lengths, reasons) -> None:
        for row in torch.nonzero(alive).flatten().tolist():
            if self.stop_at_eos:
                hits = torch.nonzero((z[row, s:e] == self.eos_id) & ~fixed[row, s:e]).flatten()
                if hits.numel():
                    alive[row], lengths[row], reasons[row] = False, s + int(hits[0]) + 1, "eos"
                    continue
            if self.stop_entropy is not None and e >= self.entropy_window:
                if unigram_entropy(z[row, e - self.entropy_window:e]) < self.stop_entropy:
                    alive[row], lengths[row], reasons[row] = False, e, "entropy"


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


@register_sampler("blockwise", BlockwiseConfig,
                  description="block by block, left to right, with an inner sampler (bd3lm with a KV cache, or MDLM)")
def make_blockwise_sampler(steps: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                           block_length: int | None = None, inner_sampler: str = "ancestral_cache",
                           kv_cache: bool = True, window: int | None = None, stop_at_eos: bool = False,
                           eos_id: int | None = None, stop_entropy: float | None = None, entropy_window: int = 256,
                           fill_id: int | None = None, feedback=None) -> BlockwiseSampler:
    """The registry's "blockwise": `inner_sampler` (any registered name: ancestral, ancestral_cache,
    first_hitting, ...) with `steps` steps over all blocks; `feedback` (soft-masking) goes to the inner sampler."""
    spec = sampler_spec(inner_sampler)
    common = {"steps": steps, "temperature": temperature, "top_p": top_p}
    inner = make_sampler(inner_sampler, **{k: v for k, v in common.items() if k in spec.options},
                         **({} if feedback is None else {"feedback": feedback}))
    return BlockwiseSampler(inner, block_length, kv_cache, window, stop_at_eos, eos_id, stop_entropy, entropy_window,
                            fill_id, steps=steps if hasattr(inner, "steps") else None)
