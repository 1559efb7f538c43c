"""LLaDA-style block-wise confidence sampling (Nie et al. 2025, arXiv 2502.09992), with Fast-dLLM's caches
and parallel-decoding policies (Wu et al. 2025, arXiv 2505.22618).

The canvas is prompt + N masks; the N positions are split into blocks of `block_length`, generated left
to right, each with steps / num_blocks steps. At every step the network predicts the current block's
masked positions: the prediction is the argmax of Gumbel-perturbed logits in float64 at temperature tau
(tau = 0: argmax). Each masked position of the block gets a score (`remasking`):

    low_confidence  probability of its prediction          random   a uniform draw in [0, 1)
    margin          top-1 minus top-2 probability           entropy  exp(-entropy) of the prediction, in [1/V, 1]

and an `UnmaskingPolicy` (dlm.sampler.policies) picks which to commit: the count schedule (LLaDA), a
confidence threshold or the factor rule (Fast-dLLM). Every score lies in [0, 1], so each policy works with each
ordering (what a threshold means for each: dlm.sampler.policies). Positions after the current block are never
committed; committed and prompt tokens never change. With the threshold and factor rules a block takes
as many steps as it needs (at most block_length); `steps` only sets the count schedule's budget. NFE
counts the network calls made: a block that is full ends, so a budget above block_length costs
block_length calls (LLaDA's loop would make calls that commit nothing).

Batches: a row whose block is full leaves the forward passes until the next block begins (no compute is
spent on it), so each prompt makes exactly the calls it would make alone (`nfe_per_row`); the batch's
NFE is the number of steps, set by its slowest prompt in each block. Rows stopped by the callback leave the
batch for good.

Caches (`cache=`, dlm.sampler.fast_dllm): "prefix" or "dual", refreshed at every block's first step.
`block_causal=True` samples a model whose blocks cannot see later blocks (a block-diffusion model); the
caches are then exact for a network without time conditioning (with it, the cached keys and values keep the
time of the block's first step while the uncached forward sees each step's own time).

A time-conditioned network is fed, at each step, the time t whose mask rate 1 - alpha_t equals the fraction of
the row's generated positions still masked (the time its training paired with that many masks).

Classifier-free guidance (cfg_scale s > 0): logits = u + (s + 1)(c - u), u from the same canvas with the
prompt masked; both passes run as one doubled batch (counted as one network call), combined in float32 (bf16
halves would round the difference c - u away). `suppress_ids_in_confidence` (e.g. EOS) moves positions
predicting those ids below every other candidate in the ordering, so they are committed last; the prediction
and the other positions' confidences are unchanged. LLaDA's reference option `confidence_eos_eot_inf` differs:
after the argmax it sets the EoT logit to -inf in the logits its confidences are computed from (and the EOS logit
in the Gumbel-perturbed copy, which at temperature 0 is the same tensor, so both then), so a position predicting
EoT (and EOS at temperature 0) gets confidence 0 and every other position's confidence is renormalised without
that mass, p / (1 - p_EoT - p_EOS): under the count schedule the order is the same as ours, but a confidence
threshold or the factor rule commits more positions there than here.

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

from dlm.network import KVCache
import dlm.sampler.fast_dllm as fast_dllm
from dlm.sampler.base import Canvas, InputFeedback, SampleOutput, Sampler, StepReporter, generators_of, rand_rows
from dlm.sampler.llada_forward import Context, canvas_attention_mask, feedback_inputs, forward_block
from dlm.sampler.policies import CountSchedule, UnmaskingPolicy, make_policy
from dlm.sampler.registry import check_steps, check_temperature, register_sampler

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
    block_causal: bool = False  # a model whose blocks cannot see later blocks (block diffusion)

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
        make_policy(self.threshold, self.factor)  # validates


class LLaDASampler(Sampler):
    name = "llada"
    takes_feedback = True

    def __init__(self, steps: int = 64, block_length: int | None = None, temperature: float = 0.0,
                 remasking: str = "low_confidence", policy: UnmaskingPolicy | None = None, cfg_scale: float = 0.0,
                 cache: str = "none", feedback: InputFeedback | None = None,
                 suppress_ids_in_confidence: tuple[int, ...] = (), block_causal: bool = False):
        LLaDAConfig(steps, block_length, temperature, 1.0, remasking, cfg_scale=cfg_scale, cache=cache)  # validates
        policy = policy or CountSchedule()
        self.steps, self.block_length, self.temperature, self.remasking = steps, block_length, temperature, remasking
        self.policy, self.cfg_scale, self.cache = policy, cfg_scale, cache
        self.feedback, self.block_causal = feedback, block_causal
        self.suppress_ids = list(suppress_ids_in_confidence)

    @torch.no_grad()
    def sample(self, network, process, canvas: Canvas, generator=None, callback=None) -> SampleOutput:
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
        x = canvas.tokens.clone()
        idx = torch.arange(T, device=x.device)
        key_valid = canvas.key_valid if canvas.key_valid is not None else torch.ones_like(to_generate)
        ctx = Context(network, process, idx if canvas.positions is None else canvas.positions,
                      canvas_attention_mask(key_valid, gen_start, block_length, self.block_causal),
                      key_valid & (idx < gen_start), gen_start, self.cfg_scale)
        steps = StepReporter(B, callback, T)
        for b in range(num_blocks):
            self._block(ctx, x, (gen_start + b * block_length, gen_start + (b + 1) * block_length),
                        self.steps // num_blocks, to_generate, steps, generator)
            if steps.all_stopped:
                break
        return steps.output(x)

    def _block(self, ctx, x, block, steps_per_block, generated, steps, generator) -> None:
        """Generate one block [start, end) of x (B, T) in place."""
        (start, end), B, T = block, x.shape[0], x.shape[1]
        process = ctx.process
        cache, members, block_embeds, step, rows, sub = None, None, None, 0, None, None
        while True:
            active = process.is_noise(x[:, start:end]).any(1) & steps.live(x.device)  # (B,): rows with masks left
            if not active.any():
                break
            if cache is None and step == 0 and self.cache != "none":  # the refresh: every live row, whole canvas
                members = steps.live(x.device).nonzero().squeeze(1)  # the rows the cache holds, in order
                mctx, xs = (ctx, x) if members.shape[0] == B else (ctx.select(members), x[members])
                full = KVCache()  # collects every layer's keys/values
                raw_block = forward_block(mctx, xs, (0, T), block, None, full, None, cache_update=True)
                fed = T
                cache = fast_dllm.keep_cached(self.cache, full, start, end)
                rows, sub = members, (mctx, cache)
            else:  # only the rows still active: a finished row costs no compute and waits for the next block
                if rows is None or rows.shape[0] != int(active.sum()):  # the first step, or a row finished
                    rows = active.nonzero().squeeze(1)  # (B_a,)
                    sub = self._sub_batch(ctx, cache, members, rows)
                sub_ctx, sub_cache = sub
                embeds = None if block_embeds is None else block_embeds[rows]
                if sub_cache is None:  # no cache: the whole canvas
                    raw_block = forward_block(sub_ctx, x[rows], (0, T), block, embeds, None, None, cache_update=False)
                    fed = T
                else:
                    span = fast_dllm.query_span(self.cache, start, end, T)
                    mask = fast_dllm.step_attention_mask(sub_ctx.full_mask, self.cache, start, end)
                    raw_block = forward_block(sub_ctx, x[rows], span, block, embeds, sub_cache, mask,
                                              cache_update=False)
                    fed = span[1] - span[0]
            steps.called(rows, fed)
            x_block = x[rows, start:end]  # (B_a, block_length)
            candidates = process.is_noise(x_block)
            x_theta = process.denoise(raw_block)  # (B_a, block_length, V)
            x0, score = self._predict(x_theta, generators_of(generator, rows))
            confidence = torch.where(candidates, score, float("-inf"))
            commit = self.policy.select(confidence, candidates.sum(1), step, steps_per_block) & candidates
            x[rows, start:end] = torch.where(commit, x0, x_block)
            if self.feedback is not None:
                block_embeds = feedback_inputs(self.feedback, ctx, x, rows, block, raw_block, generated, block_embeds)
            committed = torch.zeros_like(x, dtype=torch.bool)
            committed[rows, start:end] = commit
            chosen = None
            if steps.callback is not None:
                chosen = torch.zeros(x.shape, device=x.device)
                prob = x_theta.softmax(-1).gather(-1, x0[..., None]).squeeze(-1)  # (B_a, block_length)
                chosen[rows, start:end] = torch.where(commit, prob, 0.0)
            steps.report(x, committed, chosen)
            step += 1
            if step > max(end - start, steps_per_block):
                raise RuntimeError(f"{self.policy!r} committed nothing for {step} steps; a policy must commit "
                                   "at least one candidate per step")

    def _sub_batch(self, ctx, cache, members, rows):
        """(context, cache) of the active rows (B_a,); the cache holds `members` (and, guided, their
        unconditional rows after them)."""
        if cache is None:
            return (ctx, None) if rows.shape[0] == ctx.prompt.shape[0] else (ctx.select(rows), None)
        if rows.shape[0] == members.shape[0]:
            return (ctx if members.shape[0] == ctx.prompt.shape[0] else ctx.select(members)), cache
        pos = torch.searchsorted(members, rows)  # where each row sits in the cache
        cache_rows = torch.cat((pos, pos + members.shape[0])) if self.cfg_scale > 0 else pos
        return ctx.select(rows), cache.select(cache_rows)

    def _predict(self, logits, generator):
        """Predictions (B, L) and their scores (B, L) float64 from x_theta logits (B, L, V)."""
        logits = logits.double()  # float64: Gumbel-max in float32 acts like a lowered temperature
        if self.temperature > 0:
            u = rand_rows(generator, tuple(logits.shape), logits.device, torch.float64)
            gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
            x0 = (logits / self.temperature + gumbel).argmax(-1)
        else:
            x0 = logits.argmax(-1)
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


@register_sampler("llada", LLaDAConfig, description="LLaDA block-wise confidence decoding of a prompt's "
                  "continuation, with Fast-dLLM's threshold/factor rules and KV caches")
def make_llada_sampler(steps: int = 64, block_length: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                       remasking: str = "low_confidence", threshold: float | None = None, factor: float | None = None,
                       cfg_scale: float = 0.0, cache: str = "none", feedback: InputFeedback | None = None,
                       suppress_ids_in_confidence: tuple[int, ...] = (), block_causal: bool = False) -> LLaDASampler:
    """The registry's "llada": the count schedule, or threshold / factor parallel decoding when given."""
    return LLaDASampler(steps, block_length, temperature, remasking, make_policy(threshold, factor), cfg_scale, cache,
                        feedback, suppress_ids_in_confidence, block_causal)


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
