"""LLaDA-style block-wise confidence sampling (Nie et al. 2025, arXiv 2502.09992), with Fast-dLLM's caches
and parallel-decoding policies (Wu et al. 2025, arXiv 2505.22618).

The canvas is prompt + N masks; the N positions are split into blocks of `block_length`, generated left
to right, each with steps / num_blocks steps. At every step the network predicts the current block's
masked positions: the prediction is the argmax of Gumbel-perturbed logits in float64 at temperature tau
(tau = 0: argmax). Each masked position of the block gets a score (`remasking`):

    low_confidence  probability of its prediction          random   a uniform draw in [0, 1)
    margin          top-1 minus top-2 probability           entropy  exp(-entropy) of the prediction, in [1/V, 1]

and an `UnmaskingPolicy` (dlm.sampler.policies) picks which to commit: the count schedule (LLaDA), a
confidence threshold or the factor rule (Fast-dLLM), or the entropy bound (`entropy_bound=`, EB-sampler: the longest
run in score order whose entropies sum, less their largest, to at most the bound). Every score lies in [0, 1], so each policy works with each
ordering (what a threshold means for each: dlm.sampler.policies). Positions after the current block are never
committed; committed and prompt tokens never change. With the threshold, factor and entropy-bound rules a block takes
as many steps as it needs (at most block_length); `steps` only sets the count schedule's budget. NFE
counts the network calls made: a block that is full ends, so a budget above block_length costs
block_length calls (LLaDA's loop would make calls that commit nothing).

Batches: a row whose block is full leaves the forward passes until the next block begins (no compute is
spent on it), so each prompt makes exactly the calls it would make alone (`nfe_per_row`); the batch's
NFE is the number of steps, set by its slowest prompt in each block. Rows stopped by the callback leave the
batch for good.

Step by step (`start` / `step`, dlm.sampler.state; `sample` is the base class's loop over them): each row has its
own block and step within it (`extras`: block, block_step, gen_length), its soft-masking inputs and its cache (a
list with one entry per row: rows refreshed together share one KVCache). Rows in the same block (the same span of
the canvas) share each call and wait for each other at its end, which is the batch behaviour above; a row that
joined later and sits in another block is called separately, and a longer prompt joining left-pads the running
rows' canvases and caches with keys no query sees. A row's tokens are the ones it gets alone.

Caches (`cache=`, dlm.sampler.fast_dllm): "prefix" or "dual", refreshed at every block's first step.
`block_causal=True` samples a model whose blocks cannot see later blocks (a block-diffusion model); the
caches are then exact for a network without time conditioning (with it, the cached keys and values keep the
time of the block's first step while the uncached forward sees each step's own time).

A time-conditioned network is fed, at each step, the time t whose mask rate 1 - alpha_t equals the fraction of
the row's generated positions still masked (the time its training paired with that many masks).

Classifier-free guidance (cfg_scale s > 0): logits = u + (s + 1)(c - u), u from the same canvas with the
prompt masked; both passes run as one doubled batch (counted as one network call), combined in float32 (bf16
halves would round the difference c - u away).

Two rules for end-of-text predictions, not the same:
- `suppress_ids_in_confidence` (dlm's; e.g. EOS) moves positions predicting those ids below every other candidate in
  the ordering, so they are committed last; the predictions and every other position's confidence are unchanged.
- `confidence_eos_eot_inf=(EOS, EoT)` is LLaDA's option of that name (its generate.py; LLaDA's ids 126081, 126348):
  after the prediction, the EoT logit is set to -inf in the logits the confidences are computed from (and the EOS
  logit in the Gumbel-perturbed copy, which at temperature 0 is the same tensor: both go then). A position predicting
  EoT (and EOS at temperature 0) gets confidence 0, and every other position's confidence becomes
  p / (1 - p_EoT - p_EOS) (at temperature > 0: p / (1 - p_EoT)) with its own p_EoT and p_EOS: each position is
  renormalised by its own factor, so where EOS / EoT carry probability the order of the other positions changes too
  (a position whose remaining mass is mostly EoT rises), and a threshold or the factor rule reads the renormalised
  numbers. The first rule does not reproduce LLaDA's; the second does (tests/sampler/test_llada.py). margin and
  entropy scores are computed from the same renormalised distribution; random scores are unaffected.

Prompts of different lengths are left-padded (`Canvas.left_padded`): pads are masked out as keys and every row's
rotary positions start at 0 on its first real token, so a prompt's tokens do not depend on its padding.
The forward passes (mask, positions, guidance, caches, soft-masking inputs) live in dlm.sampler.llada_forward.

Soft-masking (`feedback=`, an InputFeedback): after each step the still-masked positions of the current
block are fed the embeddings the feedback builds from this step's logits; later blocks are fed [MASK].
This rule is the same with and without a cache, so the caches stay as exact as without soft-masking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlm.network import KVCache
import dlm.sampler.fast_dllm as fast_dllm
from dlm.sampler.base import Canvas, InputFeedback, SampleOutput, Sampler, StepEvent, generators_of, rand_rows
from dlm.sampler.llada_forward import Context, canvas_attention_mask, feedback_inputs, forward_block
from dlm.sampler.policies import CountSchedule, UnmaskingPolicy, make_policy
from dlm.sampler.registry import check_steps, check_temperature, register_sampler
from dlm.sampler.state import SamplerState

REMASKING = ("low_confidence", "random", "margin", "entropy")


@dataclass
class PromptedOutput(SampleOutput):
    """`generate_llada`'s result: tokens (B, N) are the generated ids of each prompt; sequences: prompt + generated
    ids, unpadded. nfe_per_row (B,): the calls each prompt took part in, which is what it costs alone."""

    sequences: list[list[int]] | None = None


@dataclass
class LLaDAConfig:
    steps: int = 64  # the count schedule's total over all blocks (a multiple of the number of blocks)
    block_length: int | None = None  # None: one block of the whole generation
    temperature: float = 0.0
    top_p: float = 1.0  # no nucleus filtering: must stay 1
    remasking: str = "low_confidence"
    threshold: float | None = None  # Fast-dLLM confidence threshold instead of the count schedule
    factor: float | None = None  # Fast-dLLM factor rule instead of the count schedule
    cfg_scale: float = 0.0
    cache: str = "none"  # none | prefix | dual
    feedback: InputFeedback | None = None  # soft-masking
    suppress_ids_in_confidence: tuple[int, ...] = ()
    confidence_eos_eot_inf: tuple[int, ...] = ()  # (EOS id, EoT id): LLaDA's rule of that name (LLaDA: 126081, 126348)
    block_causal: bool = False  # a model whose blocks cannot see later blocks (block diffusion)
    entropy_bound: float | None = None  # EB-sampler's entropy-bound rule instead of the count schedule (nats)

    def __post_init__(self):
        check_steps(self.steps)
        check_temperature(self.temperature)
        if self.top_p != 1.0:
            raise ValueError(f"top_p={self.top_p}: the llada sampler takes the argmax of Gumbel-perturbed logits and "
                             "has no nucleus filtering; leave top_p at 1")
        if self.block_length is not None and self.block_length < 1:
            raise ValueError(f"block_length={self.block_length} must be a positive integer (or None: one block)")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale={self.cfg_scale} must be >= 0 (0 = no classifier-free guidance)")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking='{self.remasking}' is unknown; valid: {', '.join(REMASKING)}")
        fast_dllm.check_cache_mode(self.cache)
        make_policy(self.threshold, self.factor, self.entropy_bound)  # validates
        check_eos_eot(self.confidence_eos_eot_inf)


class LLaDASampler(Sampler):
    name = "llada"
    takes_feedback = True

    def __init__(self, steps: int = 64, block_length: int | None = None, temperature: float = 0.0,
                 remasking: str = "low_confidence", policy: UnmaskingPolicy | None = None, cfg_scale: float = 0.0,
                 cache: str = "none", feedback: InputFeedback | None = None,
                 suppress_ids_in_confidence: tuple[int, ...] = (), block_causal: bool = False,
                 confidence_eos_eot_inf: tuple[int, ...] = ()):
        LLaDAConfig(steps, block_length, temperature, 1.0, remasking, cfg_scale=cfg_scale, cache=cache,
                    confidence_eos_eot_inf=tuple(confidence_eos_eot_inf))  # validates
        policy = policy or CountSchedule()
        self.steps, self.block_length, self.temperature, self.remasking = steps, block_length, temperature, remasking
        self.policy, self.cfg_scale, self.cache = policy, cfg_scale, cache
        self.feedback, self.block_causal = feedback, block_causal
        self.suppress_ids = list(suppress_ids_in_confidence)
        self.eos_eot = tuple(confidence_eos_eot_inf)

    @torch.no_grad()
    def start(self, network, process, canvas: Canvas, generator=None) -> SamplerState:
        """canvas (B, T): (left-padded) prompts followed by the positions to generate, one suffix of the same length
        in every row (`Canvas.left_padded` builds it from token lists)."""
        process.check_sampler(self)
        to_generate = canvas.to_generate
        B, T = canvas.shape
        gen_start = T - int(to_generate[0].sum())
        if not (to_generate[:, gen_start:].all() and not to_generate[:, :gen_start].any()):
            raise ValueError("the llada sampler continues a prompt: the generated positions must be one suffix of the "
                             "canvas, the same in every row (for infilling templates use the ancestral sampler)")
        N = T - gen_start
        if N < 1:
            raise ValueError("nothing to generate: gen_length must be positive")
        block_length = self.block_length or N
        if N % block_length:
            raise ValueError(f"block_length={block_length} does not divide gen_length={N}; choose a block length that "
                             "divides it (or gen_length a multiple of block_length)")
        num_blocks = N // block_length
        if self.steps % num_blocks:
            raise ValueError(f"steps={self.steps} is not divisible by the number of blocks ({num_blocks} = gen_length "
                             f"{N} / block_length {block_length}); use a multiple of {num_blocks}")
        device = canvas.tokens.device
        zeros = lambda dtype: torch.zeros(B, dtype=dtype, device=device)  # noqa: E731
        most = num_blocks * min(self.steps // num_blocks, block_length) if isinstance(self.policy, CountSchedule) else N
        extras = {"block": zeros(torch.long), "block_step": zeros(torch.long), "gen_length": zeros(torch.long) + N,
                  "fed": zeros(torch.bool), "embeds": None, "cache": [None] * B, "memo": _Memo()}
        state = SamplerState.begin(network, process, canvas, generator, most, extras)
        extras["left"] = self._masks_left(state)  # (B,) bool: masks left in the row's block (kept up to date)
        return state

    def _geometry(self, state: SamplerState):
        """Each row's current block [start, end) (B,) long on the canvas, its number of blocks and steps per block."""
        n = state.extras["gen_length"]
        length = n if self.block_length is None else torch.full_like(n, self.block_length)
        start = state.length - n + state.extras["block"] * length
        return start, start + length, n // length, self.steps // (n // length)

    def _masks_left(self, state: SamplerState) -> torch.Tensor:
        """(B,) bool: rows not done with masks left in their current block."""
        start, end, _, _ = self._geometry(state)
        idx = torch.arange(state.length, device=state.tokens.device)
        in_block = (idx >= start[:, None]) & (idx < end[:, None])  # (B, T)
        return (state.process.is_noise(state.tokens) & state.to_generate & in_block).any(1) & ~state.done

    def _advance(self, state: SamplerState) -> torch.Tensor:
        """Rows whose block is over move to their next block (step 0, no feedback inputs yet), or are done after
        their last. A block is over for a row when no row sharing it (the same span of the canvas, not done) has
        masks left there: rows of one block wait for each other, so they refresh a cache and step together.
        Returns the rows with masks left in their block (`extras["left"]`, updated)."""
        ex = state.extras
        left = ex["left"] & ~state.done
        while bool((~state.done & ~left).any()):  # only then may a block be over (a row waits, or is through)
            start, end, blocks, _ = self._geometry(state)
            same = (start[:, None] == start[None, :]) & (end[:, None] == end[None, :])  # (B, B)
            over = ~state.done & ~(same & left[None, :]).any(1)
            if not bool(over.any()):
                break
            last = ex["block"] + 1 >= blocks
            state.done = state.done | (over & last)
            ex["block"] = ex["block"] + (over & ~last).long()
            ex["block_step"] = torch.where(over, 0, ex["block_step"])
            ex["fed"] = ex["fed"] & ~over
            left = self._masks_left(state)
        ex["left"] = left
        return left

    def _context(self, state: SamplerState) -> Context:
        """What every call of this batch shares (its attention mask, prompt and positions), kept while the rows do."""
        memo, ex = state.extras["memo"], state.extras
        key = (state.key_valid, state.positions, state.to_generate, ex["gen_length"], state.network, state.process)
        if memo.context is not None and len(memo.context_key) == len(key) and \
                all(a is b for a, b in zip(memo.context_key, key)):
            return memo.context
        T = state.length
        idx = torch.arange(T, device=state.tokens.device)
        key_valid = state.key_valid if state.key_valid is not None else torch.ones_like(state.to_generate)
        gen_start = T - ex["gen_length"]
        length = ex["gen_length"] if self.block_length is None else self.block_length
        memo.context = Context(state.network, state.process, idx if state.positions is None else state.positions,
                               canvas_attention_mask(key_valid, gen_start, length, self.block_causal),
                               key_valid & (idx < gen_start[:, None]), state.to_generate, self.cfg_scale)
        memo.context_key = key
        return memo.context

    @torch.no_grad()
    def step(self, state: SamplerState) -> tuple[SamplerState, StepEvent]:
        """One step of every row with masks left in its block. Rows in the same block (the same span of the canvas)
        share one network call (a cache refresh and the cached steps after it are separate calls); rows in
        different blocks (a row that joined later) are called separately."""
        x, ex = state.tokens, state.extras
        active = self._advance(state)  # rows stopped (or gone) may have ended a block for those waiting on them
        start, end, _, per_block = self._geometry(state)
        ctx = self._context(state)
        committed = torch.zeros_like(x, dtype=torch.bool)
        chosen = torch.zeros(x.shape, device=x.device) if state.confidence else None
        rows_at = torch.stack((start, end, active.long(), ex["block_step"])).tolist()
        spans = sorted({(s, e) for s, e, a, _ in zip(*rows_at) if a})
        for s, e in spans:
            group = [r for r, (s_, e_, a, _) in enumerate(zip(*rows_at)) if a and (s_, e_) == (s, e)]
            refresh = [r for r in group if self.cache != "none" and rows_at[3][r] == 0]
            for part in (refresh, [r for r in group if r not in refresh]):
                if part:
                    self._call(state, ctx, torch.tensor(part, device=x.device), (s, e), part is refresh, per_block,
                               committed, chosen)
        if bool((ex["block_step"] > torch.maximum(end - start, per_block)).any()):
            raise RuntimeError(f"{self.policy!r} committed nothing for a whole block; a policy must commit at least "
                               "one candidate per step")
        state.step = state.step + active.long()
        self._advance(state)
        event = StepEvent(state.events, x, committed, chosen, state.calls, state.nfe_per_row.clone())
        state.events += 1
        return state, event

    def _call(self, state, ctx, rows, block, refresh: bool, per_block, committed, chosen) -> None:
        """One network call on the batch rows `rows` (B_a,) of one block [start, end), and their commits, in place."""
        network, process, x, ex = state.network, state.process, state.tokens, state.extras
        (start, end), T = block, state.length
        whole = rows.shape[0] == state.batch
        sub_ctx, xs = (ctx, x) if whole else (ctx.select(rows), x[rows])
        embeds = None
        if ex["embeds"] is not None and bool(ex["fed"][rows].any()):  # soft-masking inputs (rows without: tokens)
            has = ex["fed"][rows]
            embeds = torch.where(has[:, None, None], ex["embeds"][rows, start:end],
                                 network.embed(xs[:, start:end]).to(ex["embeds"].dtype))
        if refresh:  # the cache's refresh: the whole canvas, every layer's keys and values kept
            full = KVCache()
            raw_block = forward_block(sub_ctx, xs, (0, T), block, None, full, None, cache_update=True)
            fed = T
            cache = fast_dllm.keep_cached(self.cache, full, start, end)
            for i, row in enumerate(rows.tolist()):
                ex["cache"][row] = _RowCache(cache, i, rows.shape[0], T)
        elif self.cache == "none":
            raw_block = forward_block(sub_ctx, xs, (0, T), block, embeds, None, None, cache_update=False)
            fed = T
        else:
            span = fast_dllm.query_span(self.cache, start, end, T)
            mask = fast_dllm.step_attention_mask(sub_ctx.full_mask, self.cache, start, end)
            raw_block = forward_block(sub_ctx, xs, span, block, embeds, self._rows_cache(state, rows), mask,
                                      cache_update=False)
            fed = span[1] - span[0]
        state.calls += 1
        on_cpu = rows.cpu()
        state.nfe_per_row[on_cpu] += 1
        state.tokens_computed[on_cpu] += fed
        x_block = xs[:, start:end]  # (B_a, block_length)
        candidates = process.is_noise(x_block)
        x_theta = process.denoise(raw_block)  # (B_a, block_length, V)
        x0, commit = self._choose(state, rows, x_theta, candidates, per_block, block)
        commit = commit & candidates
        x_block = torch.where(commit, x0, x_block)
        x[rows, start:end] = x_block
        ex["left"] = ex["left"].index_copy(0, rows, (candidates & ~commit).any(1))
        ex["block_step"] = ex["block_step"].index_add(0, rows, torch.ones_like(rows))
        if self.feedback is not None:
            new = feedback_inputs(self.feedback, sub_ctx, x if whole else x[rows], block, raw_block)
            if new is not None:
                if ex["embeds"] is None:
                    ex["embeds"] = network.embed.weight.new_zeros((state.batch, T, new.shape[-1]))
                ex["embeds"][rows, start:end] = new.to(ex["embeds"].dtype)
            ex["fed"] = ex["fed"].index_fill(0, rows, new is not None)
        committed[rows, start:end] = commit
        if chosen is not None:
            prob = x_theta.softmax(-1).gather(-1, x0[..., None]).squeeze(-1)  # (B_a, block_length)
            chosen[rows, start:end] = torch.where(commit, prob, 0.0)

    def _choose(self, state, rows, x_theta, candidates, per_block, block):
        """The predictions (B_a, b) and the positions to commit (B_a, b) bool of the batch rows `rows` from their
        block's x_theta logits (B_a, b, V); candidates (B_a, b): the block's masked positions. LLaDA's rule: the
        prediction scored by `remasking`, the positions picked by the unmasking policy (a subclass, the Dream
        sampler, has its own)."""
        ex = state.extras
        x0, score = self._predict(x_theta, generators_of(state.generators, rows))
        confidence = torch.where(candidates, score, float("-inf"))
        keys = list(zip(*torch.stack((ex["block_step"][rows], per_block[rows])).tolist()))  # (step, budget) per row
        h = _entropy(x_theta) if getattr(self.policy, "needs_entropy", False) else None  # (B_a, block_length)
        if len(set(keys)) == 1:
            return x0, self.policy.select(confidence, candidates.sum(1), *keys[0],
                                          **({} if h is None else {"entropy": h}))
        commit = torch.zeros_like(candidates)  # rows at the same step of the same budget: one selection
        for key in sorted(set(keys)):
            these = torch.tensor([k == key for k in keys], device=candidates.device)
            commit[these] = self.policy.select(confidence[these], candidates[these].sum(1), *key,
                                               **({} if h is None else {"entropy": h[these]}))
        return x0, commit

    def _rows_cache(self, state, rows) -> KVCache:
        """The cache of the batch rows `rows` (B_a,) (guided: their conditional rows, then their unconditional
        ones), kept while the rows stay the same. Rows refreshed together share one cache (picked, not copied, when
        all of them step); a row whose canvas was left-padded since (a longer row joined) gets as many invalid keys
        in front, so its cache lines up with the canvas again."""
        entries = [state.extras["cache"][r] for r in rows.tolist()]
        memo = state.extras["memo"]
        if memo.entries is not None and memo.length == state.length and len(memo.entries) == len(entries) and \
                all(a is b for a, b in zip(memo.entries, entries)):
            return memo.cache
        guided = self.cfg_scale > 0
        first = entries[0]
        if all(e.cache is first.cache for e in entries) and first.length == state.length:
            pos = torch.tensor([e.index for e in entries], device=rows.device)
            if len(entries) == first.rows and bool((pos == torch.arange(first.rows, device=rows.device)).all()):
                cache = first.cache
            else:
                cache = first.cache.select(torch.cat((pos, pos + first.rows)) if guided else pos)
        else:
            halves = [[_left_pad_cache(e.cache.select(torch.tensor([e.index + h * e.rows], device=rows.device)),
                                       state.length - e.length) for e in entries] for h in range(1 + guided)]
            cache = KVCache.cat([c for half in halves for c in half])
        memo.entries, memo.cache, memo.length = entries, cache, state.length
        return cache

    def _predict(self, logits, generator):
        """Predictions (B, L) and their scores (B, L) float64 from x_theta logits (B, L, V)."""
        logits = logits.double()  # float64: Gumbel-max in float32 acts like a lowered temperature
        if self.temperature > 0:
            u = rand_rows(generator, tuple(logits.shape), logits.device, torch.float64)
            gumbel = u.clamp_min_(torch.finfo(torch.float64).tiny).log_().neg_().log_().neg_()  # in place: (B, L, V)
            x0 = gumbel.add_(logits / self.temperature).argmax(-1)
        else:
            x0 = logits.argmax(-1)
        if self.eos_eot:  # LLaDA's confidence_eos_eot_inf: after the prediction, out of the confidences' logits
            eos, eot = self.eos_eot
            logits = logits.clone()
            logits[..., eot] = float("-inf")
            if self.temperature == 0:  # LLaDA's Gumbel copy is then the logits themselves: EOS goes too
                logits[..., eos] = float("-inf")
        probs = logits.softmax(-1)
        if self.remasking == "low_confidence":
            score = probs.gather(-1, x0[..., None]).squeeze(-1)
        elif self.remasking == "margin":
            top2 = probs.topk(2, dim=-1).values
            score = top2[..., 0] - top2[..., 1]
        elif self.remasking == "entropy":
            score = torch.special.xlogy(probs, probs).sum(-1).exp()  # exp(-H): xlogy(0, 0) = 0 at the [MASK] logit
        else:
            score = rand_rows(generator, tuple(x0.shape), x0.device, torch.float64)
        if self.suppress_ids:
            # Every score lies in [0, 1]; shifting by 2 puts these below all others, order kept.
            suppressed = torch.isin(x0, torch.tensor(self.suppress_ids, device=x0.device))
            score = torch.where(suppressed, score - 2.0, score)
        return x0, score


def _entropy(x_theta: torch.Tensor) -> torch.Tensor:
    """(..., ) entropy in nats (float64) of softmax(x_theta (..., V)); the [MASK] logit (-inf) contributes 0."""
    probs = x_theta.double().softmax(-1)
    return -torch.special.xlogy(probs, probs).sum(-1)


@dataclass
class _RowCache:
    """A row's Fast-dLLM cache: row `index` of `cache`, refreshed for `rows` rows together (guided: the
    unconditional row is index + rows) on a canvas of `length` positions."""

    cache: KVCache
    index: int
    rows: int
    length: int


class _Memo:
    """The last cache built for a sub-batch of rows (shared by every state of one run)."""

    length: int = 0
    entries: list | None = None
    context: Context | None = None  # the last batch's Context, and what it was built from
    context_key: tuple = ()
    cache: KVCache | None = None


def _left_pad_cache(cache: KVCache, n: int) -> KVCache:
    """The cache with n invalid keys (zeros) in front of each row's (its canvas was left-padded by n)."""
    if n == 0:
        return cache
    pad = lambda t: F.pad(t, (0, 0, n, 0))  # noqa: E731  (..., T, C): n zero rows in front
    valid = cache.key_valid
    if valid is None:
        valid = torch.ones(cache.batch, cache.length, dtype=torch.bool, device=cache.layers[0][0].device)
    return KVCache([(pad(k), pad(v)) for k, v in cache.layers], None if cache.hidden is None else pad(cache.hidden),
                   F.pad(valid, (n, 0), value=False))


@register_sampler("llada", LLaDAConfig, description="LLaDA block-wise confidence decoding of a prompt's "
                  "continuation, with Fast-dLLM's threshold/factor rules and KV caches")
def make_llada_sampler(steps: int = 64, block_length: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                       remasking: str = "low_confidence", threshold: float | None = None, factor: float | None = None,
                       cfg_scale: float = 0.0, cache: str = "none", feedback: InputFeedback | None = None,
                       suppress_ids_in_confidence: tuple[int, ...] = (), confidence_eos_eot_inf: tuple[int, ...] = (),
                       block_causal: bool = False, entropy_bound: float | None = None) -> LLaDASampler:
    """The registry's "llada": the count schedule, or threshold / factor / entropy-bound parallel decoding when
    given."""
    return LLaDASampler(steps, block_length, temperature, remasking, make_policy(threshold, factor, entropy_bound),
                        cfg_scale, cache, feedback, suppress_ids_in_confidence, block_causal, confidence_eos_eot_inf)


def check_eos_eot(ids: tuple[int, ...]) -> None:
    if len(ids) not in (0, 2) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"confidence_eos_eot_inf={ids!r} takes two token ids, (EOS, EoT) (LLaDA's: 126081, "
                         "126348), or none")


@torch.no_grad()
def generate_llada(network, process, prompts: list[list[int]], gen_length: int, block_length: int | None = None,
                   steps: int = 64, temperature: float = 0.0, remasking: str = "low_confidence",
                   policy: UnmaskingPolicy | None = None, cfg_scale: float = 0.0, cache: str = "none",
                   feedback: InputFeedback | None = None, suppress_ids_in_confidence: tuple[int, ...] = (),
                   generator: torch.Generator | None = None, pad_id: int | None = None, block_causal: bool = False,
                   callback=None) -> PromptedOutput:
    """Continue each prompt (a list of token ids; lengths may differ) with `gen_length` tokens: a thin helper that
    builds the left-padded `Canvas` and runs `LLaDASampler.sample`.

    Returns tokens (B, gen_length), the unpadded sequences, NFE (network calls over the batch) and the calls each
    prompt took part in (`nfe_per_row`); `tokens_per_nfe` (generated tokens only) is a property.
    """
    sampler = LLaDASampler(steps, block_length, temperature, remasking, policy, cfg_scale, cache, feedback,
                           suppress_ids_in_confidence, block_causal)
    device = next(network.parameters()).device
    canvas = Canvas.left_padded(prompts, gen_length, process, pad_id, device, generator)  # pads are never seen
    out = sampler.sample(network, process, canvas, generator, callback)
    generated = out.tokens[:, -gen_length:]
    sequences = [list(p) + row for p, row in zip(prompts, generated.tolist())]
    return PromptedOutput(generated, out.nfe, out.nfe_per_row, out.stopped, out.tokens_computed, sequences=sequences)
