"""LLaDA-style block-wise confidence sampling (Nie et al. 2025, arXiv 2502.09992), with Fast-dLLM's caches
and parallel-decoding policies (Wu et al. 2025, arXiv 2505.22618).

The canvas is prompt + N masks; the N positions are split into blocks of `block_length`, generated left
to right, each with steps / num_blocks steps. At every step the network predicts the current block's
masked positions: the prediction is the argmax of Gumbel-perturbed logits in float64 at temperature tau
(tau = 0: argmax). Each masked position of the block gets a score (`remasking`):

    low_confidence  probability of its prediction          random   a uniform draw
    margin          top-1 minus top-2 probability           entropy  negative entropy of the prediction

and an `UnmaskingPolicy` (dlm.sampler.policies) picks which to commit: the count schedule (LLaDA), a
confidence threshold or the factor rule (Fast-dLLM). Positions after the current block are never
committed; committed and prompt tokens never change. With the threshold and factor rules a block takes
as many steps as it needs (at most block_length); `steps` only sets the count schedule's budget. NFE
counts the network calls made: a block that is full ends, so a budget above block_length costs
block_length calls (LLaDA's loop would make calls that commit nothing).

Batches: a row whose block is full leaves the forward passes until the next block begins (no compute is
spent on it), so each prompt makes exactly the calls it would make alone (`nfe_per_sequence`); the batch's
NFE is the number of steps, set by its slowest prompt in each block.

Caches (`cache=`, dlm.sampler.fast_dllm): "prefix" or "dual", refreshed at every block's first step.
`block_causal=True` samples a model whose blocks cannot see later blocks (a block-diffusion model); the
caches are then exact for a network without time conditioning (with it, the cached keys and values keep the
time of the block's first step while the uncached forward sees each step's own time).

A time-conditioned network is fed, at each step, the time t whose mask rate 1 - alpha_t equals the fraction of
the row's generated positions still masked (the time its training paired with that many masks).

Classifier-free guidance (cfg_scale s > 0): logits = u + (s + 1)(c - u), u from the same canvas with the
prompt masked; both passes run as one doubled batch (counted as one network call). `suppress_ids_in_confidence`
(e.g. EOS) moves positions predicting those ids below every other candidate in the ordering, so they are
committed last; the prediction itself is unchanged (the reference applies this after the choice, where it
has no effect).

Prompts of different lengths are left-padded: pads are masked out as keys and every row's rotary
positions start at 0 on its first real token, so a prompt's tokens do not depend on its padding.

Soft-masking (`feedback=`, an InputFeedback): after each step the still-masked positions of the current
block are fed the embeddings the feedback builds from this step's logits; later blocks are fed [MASK].
This rule is the same with and without a cache, so the caches stay as exact as without soft-masking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dlm.network import KVCache
from dlm.process.clipped_schedule import time_of_mask_rate
from dlm.process.mdlm import subs_logits
from dlm.sampler import fast_dllm
from dlm.sampler.base import InputFeedback, SampleOutput, Sampler, Timer, masked_fraction
from dlm.sampler.policies import ConfidenceThreshold, CountSchedule, FactorRule, UnmaskingPolicy, make_policy

REMASKING = ("low_confidence", "random", "margin", "entropy")


@dataclass
class PromptedOutput(SampleOutput):
    """tokens (B, N): the generated ids of each prompt; sequences: prompt + generated ids, unpadded.

    nfe: network calls made for the batch (the loop's steps); nfe_per_sequence (B,): the calls each prompt took
    part in, which is what it costs alone (a finished row leaves the batch until the next block starts)."""

    sequences: list[list[int]] | None = None
    nfe_per_sequence: torch.Tensor | None = None

    @property
    def tokens_per_nfe(self) -> float:
        """Tokens committed per network call for each sequence (1.0 = one token per step), mean over the batch."""
        calls = self.nfe_per_sequence.sum() if self.nfe_per_sequence is not None else self.nfe * self.tokens.shape[0]
        return self.tokens.numel() / max(int(calls), 1)


def canvas_attention_mask(key_valid: torch.Tensor, gen_start: int, block_length: int,
                          block_causal: bool) -> torch.Tensor | None:
    """(B, 1, T, T) bool (True = may attend), or None when every position may see every other.

    key_valid (B, T): False on left padding. Pad queries see themselves only, so no softmax row is empty.
    block_causal: a query sees the keys of its own and earlier blocks only (the prompt is block 0).
    """
    B, T = key_valid.shape
    if key_valid.all() and not block_causal:
        return None
    idx = torch.arange(T, device=key_valid.device)
    allowed = key_valid[:, None, :] | torch.eye(T, dtype=torch.bool, device=key_valid.device)  # (B, T_q, T_k)
    if block_causal:
        block = torch.where(idx < gen_start, 0, (idx - gen_start) // block_length + 1)  # (T,)
        allowed = allowed & (block[None, :] <= block[:, None])
    return allowed[:, None]


class LLaDASampler(Sampler):
    name = "llada"

    def __init__(self, steps: int = 64, block_length: int | None = None, temperature: float = 0.0,
                 remasking: str = "low_confidence", policy: UnmaskingPolicy | None = None, cfg_scale: float = 0.0,
                 cache: str = "none", feedback: InputFeedback | None = None,
                 suppress_ids_in_confidence: tuple[int, ...] = (), block_causal: bool = False):
        if steps < 1:
            raise ValueError(f"steps={steps} must be a positive integer")
        if block_length is not None and block_length < 1:
            raise ValueError(f"block_length={block_length} must be a positive integer (or None: one block)")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 = argmax)")
        if cfg_scale < 0:
            raise ValueError(f"cfg_scale={cfg_scale} must be >= 0 (0 = no classifier-free guidance)")
        if remasking not in REMASKING:
            raise ValueError(f"remasking='{remasking}' is unknown; valid: {', '.join(REMASKING)}")
        policy = policy or CountSchedule()
        if remasking == "entropy" and isinstance(policy, (ConfidenceThreshold, FactorRule)):
            raise ValueError("remasking='entropy' scores are negative entropies (<= 0), which a probability "
                             "threshold or the factor rule cannot read; use low_confidence or margin with them")
        self.steps, self.block_length, self.temperature, self.remasking = steps, block_length, temperature, remasking
        self.policy, self.cfg_scale, self.cache = policy, cfg_scale, fast_dllm.check_cache_mode(cache)
        self.feedback, self.block_causal = feedback, block_causal
        self.suppress_ids = list(suppress_ids_in_confidence)

    # ----------------------------------------------------------------------------------- interface
    @torch.no_grad()
    def sample(self, network, process, canvas, fixed=None, generator=None, record_trajectory=False) -> SampleOutput:
        """canvas (B, L): a prompt prefix (the same length in every row) followed by masks to generate."""
        fixed = (canvas != process.mask_id) if fixed is None else fixed
        n_prompt = int(fixed[0].sum())
        if not (fixed[:, :n_prompt].all() and not fixed[:, n_prompt:].any()):
            raise ValueError("the llada sampler continues a prompt: the generated positions must be one suffix of the "
                             "canvas, the same in every row (for infilling templates use the ancestral sampler)")
        key_valid = torch.ones_like(fixed)
        z, nfe, _, seconds, trajectory = self._generate(network, process, canvas.clone(), n_prompt, key_valid,
                                                     generator, record_trajectory)
        return SampleOutput(z, nfe, seconds, trajectory)

    # ----------------------------------------------------------------------------------- the loop
    def _generate(self, network, process, x, gen_start, key_valid, generator, record):
        """x (B, T): left-padded prompts then masks from gen_start on; key_valid (B, T) False on padding."""
        if getattr(process, "name", "") == "ar" or not hasattr(process, "mask_id"):
            raise ValueError("the llada sampler needs a masked diffusion model (process 'mdlm'), "
                             "not an autoregressive one")
        B, T = x.shape
        N = T - gen_start
        block_length = self.block_length or N
        if N < 1:
            raise ValueError("nothing to generate: gen_length must be positive")
        if N % block_length:
            raise ValueError(f"block_length={block_length} does not divide gen_length={N}; choose a block length that "
                             "divides it (or gen_length a multiple of block_length)")
        num_blocks = N // block_length
        if self.steps % num_blocks:
            raise ValueError(f"steps={self.steps} is not divisible by the number of blocks ({num_blocks} = gen_length "
                             f"{N} / block_length {block_length}); use a multiple of {num_blocks}")
        steps_per_block = self.steps // num_blocks
        mask_id = process.mask_id
        idx = torch.arange(T, device=x.device)
        padded = not bool(key_valid.all())
        ctx = _Context(
            network=network, process=process, mask_id=mask_id,
            positions=(key_valid.long().cumsum(1) - 1).clamp(min=0) if padded else idx,  # (B, T) or (T,)
            full_mask=canvas_attention_mask(key_valid, gen_start, block_length, self.block_causal),
            prompt=key_valid & (idx < gen_start), gen_start=gen_start,
        )
        generated = (idx >= gen_start).expand(B, T)  # (B, T)
        nfe, nfe_rows, trajectory = 0, torch.zeros(B, dtype=torch.long), []
        with Timer() as timer:
            for b in range(num_blocks):
                start, end = gen_start + b * block_length, gen_start + (b + 1) * block_length
                cache, block_embeds, step, rows, sub = None, None, 0, None, None
                while True:
                    active = (x[:, start:end] == mask_id).any(1)  # (B,): rows with masks left in this block
                    if not active.any():
                        break
                    if cache is None and step == 0 and self.cache != "none":  # the refresh: every row, whole canvas
                        full = KVCache()  # collects every layer's keys/values
                        raw_block = self._forward(ctx, x, (0, T), (start, end), None, full, None, cache_update=True)
                        cache = fast_dllm.keep_cached(self.cache, full, start, end)
                        rows, sub = torch.arange(B, device=x.device), (ctx, cache)
                    else:  # only the rows still active: a finished row costs no compute and waits for the next block
                        if rows is None or rows.shape[0] != int(active.sum()):  # the first step, or a row finished
                            rows = active.nonzero().squeeze(1)  # (B_a,)
                            # a guided cache holds 2B rows: the conditional ones, then the unconditional ones
                            cache_rows = torch.cat((rows, rows + B)) if self.cfg_scale > 0 else rows
                            sub = (ctx, cache) if rows.shape[0] == B else (
                                ctx.select(rows), None if cache is None else cache.select(cache_rows))
                        sub_ctx, sub_cache = sub
                        embeds = None if block_embeds is None else block_embeds[rows]
                        if sub_cache is None:  # no cache: the whole canvas
                            raw_block = self._forward(sub_ctx, x[rows], (0, T), (start, end), embeds, None, None,
                                                      cache_update=False)
                        else:
                            span = fast_dllm.query_span(self.cache, start, end, T)
                            mask = fast_dllm.step_attention_mask(sub_ctx.full_mask, self.cache, start, end)
                            raw_block = self._forward(sub_ctx, x[rows], span, (start, end), embeds, sub_cache, mask,
                                                      cache_update=False)
                    nfe += 1
                    nfe_rows[rows.cpu()] += 1
                    x_block = x[rows, start:end]  # (B_a, block_length)
                    candidates = x_block == mask_id
                    x0, score = self._predict(subs_logits(raw_block, mask_id), generator)
                    confidence = torch.where(candidates, score, float("-inf"))
                    commit = self.policy.select(confidence, candidates.sum(1), step, steps_per_block)
                    x[rows, start:end] = torch.where(commit & candidates, x0, x_block)
                    if self.feedback is not None:
                        block_embeds = self._feedback(network, mask_id, x, rows, (start, end), raw_block, generated,
                                                      block_embeds)
                    if record:
                        trajectory.append(x.clone())
                    step += 1
                    if step > max(block_length, steps_per_block):
                        raise RuntimeError(f"{self.policy!r} committed nothing for {step} steps; a policy must commit "
                                           "at least one candidate per step")
        return x, nfe, nfe_rows, timer.seconds, trajectory

    def _feedback(self, network, mask_id, x, rows, block, raw_block, generated, block_embeds):
        """Soft-masking inputs (B, block_length, C) for the block's next step, or None (plain tokens): built for
        the active `rows` from this step's logits, each row scheduled by its own fraction of masks left."""
        start, end = block
        masks_left = masked_fraction(x[rows], mask_id, generated[rows])  # (B_a,)
        x_block = x[rows, start:end]
        new = self.feedback(network, x_block, raw_block, torch.zeros_like(x_block, dtype=torch.bool), masks_left)
        if new is None and block_embeds is None:
            return None
        if new is None:
            new = network.embed(x_block)
        if block_embeds is None:
            block_embeds = network.embed(x[:, start:end])  # (B, block_length, C); rows not active are never read
        block_embeds[rows] = new.to(block_embeds.dtype)
        return block_embeds

    def _forward(self, ctx, x, span, block, block_embeds, cache, mask, cache_update):
        """Raw logits (B, block_length, V) of the block, from a forward over the queries x[:, qs:qe] (guided when
        cfg_scale > 0). The block's still-masked positions are fed `block_embeds` (B, block_length, C) when
        soft-masking. Only the block's hidden states go through the output layer: the others are never used."""
        (qs, qe), (start, end) = span, block
        ids = x[:, qs:qe]
        embeds = None
        if block_embeds is not None:
            embeds = ctx.network.embed(ids)  # (B, T_q, C)
            embeds[:, start - qs:end - qs] = block_embeds.to(embeds.dtype)
        positions = ctx.positions[..., qs:qe]
        if mask is None and ctx.full_mask is not None:  # a whole-canvas forward
            mask = ctx.full_mask[:, :, qs:qe]
        t = None
        if ctx.process.time_conditioning:  # the time whose mask rate 1 - alpha_t is the fraction still masked
            masked = (x[:, ctx.gen_start:] == ctx.mask_id).double().mean(1)  # (B,)
            t = time_of_mask_rate(ctx.process.schedule, masked).to(torch.float32)
        if self.cfg_scale > 0:
            prompt = ctx.prompt[:, qs:qe]
            ids = torch.cat((ids, torch.where(prompt, ctx.mask_id, ids)))
            if embeds is not None:
                mask_embed = ctx.network.embed.weight[ctx.mask_id].to(embeds.dtype)
                embeds = torch.cat((embeds, torch.where(prompt[..., None], mask_embed, embeds)))
            positions = positions.repeat(2, 1) if positions.dim() == 2 else positions
            mask = None if mask is None else torch.cat((mask, mask)) if mask.shape[0] > 1 else mask
            t = None if t is None else torch.cat((t, t))
        hidden = ctx.network(None if embeds is not None else ids, inputs_embeds=embeds, t=t, attn_mask=mask,
                             positions=positions, kv_cache=cache, cache_update=cache_update, return_hidden=True)
        out = ctx.network.head(hidden[:, start - qs:end - qs])  # (B or 2B, block_length, V)
        if self.cfg_scale > 0:
            cond, uncond = out.chunk(2)
            out = uncond + (self.cfg_scale + 1) * (cond - uncond)
        return out

    def _predict(self, logits, generator):
        """Predictions (B, L) and their scores (B, L) float64 from SUBS logits (B, L, V)."""
        logits = logits.double()  # float64: Gumbel-max in float32 acts like a lowered temperature
        if self.temperature > 0:
            u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
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
            score = torch.special.xlogy(probs, probs).sum(-1)  # -H; xlogy(0, 0) = 0 at the -inf [MASK] logit
        else:
            score = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
        if self.suppress_ids:
            # Every score lies in [-log V, 1]; shifting by 2 + log V puts these below all others, order kept.
            suppressed = torch.isin(x0, torch.tensor(self.suppress_ids, device=x0.device))
            score = torch.where(suppressed, score - (2.0 + math.log(logits.shape[-1])), score)
        return x0, score


def make_llada_sampler(steps: int, temperature: float = 0.0, top_p: float = 1.0, threshold: float | None = None,
                       factor: float | None = None, **options) -> LLaDASampler:
    """The registry's "llada": the count schedule, or threshold / factor parallel decoding when given."""
    if top_p != 1.0:
        raise ValueError(f"top_p={top_p}: the llada sampler takes the argmax of Gumbel-perturbed logits and has no "
                         "nucleus filtering; leave top_p at 1")
    return LLaDASampler(steps, temperature=temperature, policy=make_policy(threshold, factor), **options)


@dataclass
class _Context:
    """What every forward of one generation shares."""

    network: torch.nn.Module
    process: object
    mask_id: int
    positions: torch.Tensor  # (T,) or per-row (B, T) rotary positions
    full_mask: torch.Tensor | None  # (B, 1, T, T) bool or None
    prompt: torch.Tensor  # (B, T) bool: real prompt tokens (masked in the unconditional pass)
    gen_start: int

    def select(self, rows: torch.Tensor) -> "_Context":
        """The context of a sub-batch: rows (B_a,) indices into the batch."""
        pick = lambda t: t if t is None or t.dim() < 2 or t.shape[0] == 1 else t[rows]  # noqa: E731
        return _Context(self.network, self.process, self.mask_id, pick(self.positions), pick(self.full_mask),
                        self.prompt[rows], self.gen_start)


def left_pad(prompts: list[list[int]], gen_length: int, mask_id: int, pad_id: int, device):
    """Canvas (B, P + gen_length) = left padding, prompt, masks; key_valid (B, P + gen_length); P = longest prompt."""
    P = max(len(p) for p in prompts)
    x = torch.full((len(prompts), P + gen_length), mask_id, dtype=torch.long)
    key_valid = torch.ones_like(x, dtype=torch.bool)
    for i, p in enumerate(prompts):
        x[i, :P - len(p)] = pad_id
        x[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        key_valid[i, :P - len(p)] = False
    return x.to(device), key_valid.to(device), P


@torch.no_grad()
def generate_llada(network, process, prompts: list[list[int]], gen_length: int, block_length: int | None = None,
                   steps: int = 64, temperature: float = 0.0, remasking: str = "low_confidence",
                   policy: UnmaskingPolicy | None = None, cfg_scale: float = 0.0, cache: str = "none",
                   feedback: InputFeedback | None = None, suppress_ids_in_confidence: tuple[int, ...] = (),
                   generator: torch.Generator | None = None, pad_id: int | None = None, block_causal: bool = False,
                   record_trajectory: bool = False) -> PromptedOutput:
    """Continue each prompt (a list of token ids; lengths may differ) with `gen_length` tokens.

    Returns tokens (B, gen_length), the unpadded sequences, NFE (network calls over the batch), the calls each
    prompt took part in (`nfe_per_sequence`), wall time; `tokens_per_nfe` and `tokens_per_second` (generated
    tokens only) are properties.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("give at least one prompt, each with at least one token (e.g. BOS)")
    if gen_length < 1:
        raise ValueError(f"gen_length={gen_length} must be positive")
    sampler = LLaDASampler(steps, block_length, temperature, remasking, policy, cfg_scale, cache, feedback,
                           suppress_ids_in_confidence, block_causal)
    device = next(network.parameters()).device
    pad = process.mask_id if pad_id is None else pad_id  # never seen: pads are masked out as keys
    x, key_valid, P = left_pad(prompts, gen_length, process.mask_id, pad, device)
    x, nfe, nfe_rows, seconds, trajectory = sampler._generate(network, process, x, P, key_valid, generator,
                                                              record_trajectory)
    generated = x[:, P:]
    sequences = [list(p) + row for p, row in zip(prompts, generated.tolist())]
    return PromptedOutput(generated, nfe, seconds, trajectory, sequences=sequences, nfe_per_sequence=nfe_rows)
