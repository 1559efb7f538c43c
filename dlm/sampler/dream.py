"""Dream's sampler (Ye et al. 2025, Dream 7B, arXiv 2508.15487: `diffusion_generate` of Dream's
`generation_utils.py`) and Fast-dLLM's block-wise Dream variant (Wu et al. 2025, arXiv 2505.22618: Fast-dLLM's
`dream/`), with Dream's names and defaults: steps, alg, alg_temp, temperature, top_p, top_k, eps.

Dream's rule (block_length None). Times 1 = t_0 > t_1 > ... > t_steps = eps (`linspace(1, eps, steps + 1)`, float32).
At step i every masked position is predicted from x_theta: the logits divided by the temperature (when > 0), cut to
the nucleus `top_p` (a token is kept when the tokens ranked above it hold at most top_p of the probability) and to
the `top_k` largest, then the prediction is drawn from the softmax (temperature 0: its argmax). Then, by `alg`:

    origin        each masked position is committed with probability 1 - t_{i+1}/t_i (every one at the last step),
                  independently: MDLM's ancestral rule on a linear schedule.
    maskgit_plus  score: the probability of the prediction.       topk_margin  score: top-1 minus top-2 probability.
    entropy       score: sum p log(p + 1e-10), the negative entropy of the (cut) distribution.

and for the three scored rules the step commits int(n (1 - t_{i+1}/t_i)) positions (n: the row's masked positions;
the last step commits all): the best scores (alg_temp None or 0), or a draw without replacement with weights
softmax(score / alg_temp) (alg_temp > 0; drawn as the top k of score / alg_temp + Gumbel noise, the same law).

Counts per row (batch invariance): Dream computes n as the mean over the batch (`mask_index.sum() / B`), so a row's
count depends on its neighbours. Here each row counts its own masks, so a prompt's tokens are the same alone and in
any batch; the two agree whenever the rows have equally many masks (a batch of one, or prompts of one length).

Calls that commit nothing are skipped. Dream calls the network at every step; a step whose count is 0 (int() rounds
down: at steps = length the first step commits int(length (1 - eps) / length) = 0 tokens) or, for origin, whose
coins all fail, leaves the canvas as it was, so the next call would see the same inputs (Dream's network takes no
time; a time-conditioned one here is fed the time of the fraction of masks left, unchanged too). The row moves on to
its next step without a call: its tokens are Dream's, and NFE counts the calls made, at most min(steps, positions to
generate). Equal scores are taken leftmost first (Dream's torch.topk leaves their order unspecified).

Random numbers, per row from its own generator, in this order: origin's coins (float32, one per position) at each
step tried, then at a call one float64 uniform per position for the predictions (temperature > 0) and one per
position for alg_temp's Gumbel keys; left padding draws nothing (batch and padding invariance).

Fast-dLLM's Dream variant (block_length set): the positions to generate (a prompt's continuation) are split into
blocks of block_length, left to right, each with steps / num_blocks steps and its own times
linspace(1, eps, steps_per_block + 1). A block's first call commits its first position (the prediction there, drawn
as above); with `cache` ("prefix" or "dual", dlm.sampler.fast_dllm) that call also refreshes the cache. Its later
calls follow the rule above from step 1 (t_1 -> t_2, ...) over the block's masked positions, or, with
alg="confidence_threshold", commit the most probable prediction and every other whose probability is at least
`threshold` (the block takes as many calls as it needs). Fast-dLLM's code scores those steps by entropy whatever
`alg` says; here `alg` chooses (alg="entropy", its own scripts' value, is its rule). The block machinery (rows in
one block share calls, caches, rows joining and leaving) is the LLaDA sampler's (dlm.sampler.llada).

The network is dlm's: shifted logits (Dream: position i read from i - 1) are the network's business, so this sampler
runs on every network. x_theta is the process's (SUBS: [MASK] is never predicted; Dream's own code keeps the [MASK]
logit, to which a trained Dream gives no mass). A time-conditioned network is fed the time whose mask rate is the
row's fraction of masks left. With a feedback (`feedback=`, soft-masking), each call's logits build the next call's
inputs (the LLaDA sampler's rule within blocks). Sampling is in float64 (the inverse CDF of one uniform per
position), the schedule in float32 as Dream's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import dlm.sampler.fast_dllm as fast_dllm
from dlm.sampler.base import Canvas, InputFeedback, StepEvent, generators_of, masked_fraction, rand_rows
from dlm.sampler.llada import LLaDASampler
from dlm.sampler.policies import ConfidenceThreshold, _top_k
from dlm.sampler.registry import check_steps, check_temperature, register_sampler
from dlm.sampler.state import SamplerState

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy", "confidence_threshold")


@dataclass
class DreamConfig:
    steps: int = 512  # Dream's default
    alg: str = "origin"  # origin | maskgit_plus | topk_margin | entropy | confidence_threshold (Fast-dLLM, blocks)
    alg_temp: float | None = None  # None or 0: the best scores; > 0: drawn with weights softmax(score / alg_temp)
    temperature: float = 0.0
    top_p: float | None = None  # None or 1: no nucleus cut
    top_k: int | None = None  # None: no top-k cut
    eps: float = 1e-3  # the last time
    block_length: int | None = None  # Fast-dLLM's block-wise variant (None: Dream's rule over the whole canvas)
    threshold: float = 0.9  # Fast-dLLM's threshold, read by alg="confidence_threshold"
    cache: str = "none"  # none | prefix | dual (Fast-dLLM's caches; with block_length)
    feedback: InputFeedback | None = None  # soft-masking (or another feedback): inputs built from the last call

    def __post_init__(self):
        check_steps(self.steps)
        check_temperature(self.temperature)
        if self.alg not in ALGS:
            raise ValueError(f"alg='{self.alg}' is unknown; valid: {', '.join(ALGS)}")
        if self.alg_temp is not None and (isinstance(self.alg_temp, bool) or not math.isfinite(self.alg_temp)
                                          or self.alg_temp < 0):
            raise ValueError(f"alg_temp={self.alg_temp} must be None or a finite number >= 0 (None or 0: the best "
                             "scores are committed)")
        if self.alg_temp and self.alg in ("origin", "confidence_threshold"):
            raise ValueError(f"alg_temp={self.alg_temp} has no effect with alg='{self.alg}' (it draws which scored "
                             "positions to commit): use alg maskgit_plus, topk_margin or entropy, or leave it unset")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (None or 1: no nucleus cut)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k} must be a positive integer (None: no top-k cut)")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps={self.eps} must be in (0, 1): the last time of linspace(1, eps, steps + 1)")
        if self.block_length is not None and (isinstance(self.block_length, bool) or self.block_length < 1):
            raise ValueError(f"block_length={self.block_length} must be a positive integer (or None: Dream's rule "
                             "over the whole canvas)")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1]")
        fast_dllm.check_cache_mode(self.cache)
        if self.block_length is None and self.cache != "none":
            raise ValueError(f"cache='{self.cache}' is Fast-dLLM's block-wise variant: give block_length too")
        if self.block_length is None and self.alg == "confidence_threshold":
            raise ValueError("alg='confidence_threshold' is Fast-dLLM's block-wise rule: give block_length too")


# ------------------------------------------------------------------------------------------ Dream's rule
def timesteps(steps: int, eps: float) -> torch.Tensor:
    """(steps + 1,) float32 times from 1 down to eps, as Dream's `torch.linspace(1, eps, steps + 1)`."""
    return torch.linspace(1, eps, steps + 1, dtype=torch.float32)


def _times(i: torch.Tensor, steps: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, s) (B,) float32: the times t_i and t_{i+1} of each row's step i (B,) long of its `steps` (B,) long."""
    t, s = torch.ones(i.shape), torch.ones(i.shape)
    for k in sorted(set(steps.tolist())):
        grid = timesteps(k, eps)
        these = steps.cpu() == k
        at = i.cpu()[these].clamp(max=k - 1)
        t[these], s[these] = grid[at], grid[at + 1]
    return t, s


def transfer_count(n: torch.Tensor, i: torch.Tensor, steps: torch.Tensor, eps: float) -> torch.Tensor:
    """(B,) long: the positions step i (B,) of `steps` (B,) commits out of n (B,) masked: int(n (1 - s / t)) in
    float32 as Dream computes it, and all n at the last step."""
    t, s = _times(i, steps, eps)
    count = (n.cpu().float() * (1 - s / t)).long()
    return torch.where(i.cpu() >= steps.cpu() - 1, n.cpu(), count).to(n.device)


def transfer_probability(i: torch.Tensor, steps: torch.Tensor, eps: float) -> torch.Tensor:
    """(B,) float32: origin's chance 1 - s / t that step i commits a masked position (1 at the last step)."""
    t, s = _times(i, steps, eps)
    return torch.where(i.cpu() >= steps.cpu() - 1, torch.ones(()), 1 - s / t)


def cut_logits(logits: torch.Tensor, temperature: float, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Dream's sampling logits (n, V) float64: divided by the temperature (when > 0), then the nucleus (a token is kept
    when the probability of the tokens ranked above it is at most top_p; the first always) and the top_k largest
    (ties kept); the others -inf."""
    logits = logits.double()
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        ranked, order = logits.sort(-1, descending=True)
        above = F.pad(ranked.softmax(-1).cumsum(-1)[..., :-1], (1, 0))  # (n, V): mass ranked above each token
        cut = torch.zeros_like(above, dtype=torch.bool).scatter_(-1, order, above > top_p)
        logits = logits.masked_fill(cut, float("-inf"))
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def predict(logits: torch.Tensor, u: torch.Tensor | None, alg: str, temperature: float, top_p: float | None,
            top_k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's `sample_tokens`: (prediction (n,) long, score (n,) float64) from x_theta logits (n, V). u (n,) float64
    uniforms: the inverse-CDF draw at temperature > 0 (None: argmax). The score is `alg`'s (module docstring);
    confidence_threshold and origin score the prediction's probability."""
    probs = cut_logits(logits, temperature, top_p, top_k).softmax(-1)  # (n, V)
    if temperature > 0:
        cdf = probs.cumsum(-1)
        target = (u.clamp_min(1e-12) * cdf[:, -1]).unsqueeze(-1)  # > 0: a token without probability is never hit
        x0 = torch.searchsorted(cdf, target).squeeze(-1).clamp_max(probs.shape[-1] - 1)
    else:
        x0 = probs.argmax(-1)
    if alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        return x0, top2[:, 0] - top2[:, 1]
    if alg == "entropy":
        return x0, (probs * torch.log(probs + 1e-10)).sum(-1)
    return x0, probs.gather(-1, x0[:, None]).squeeze(-1)


def gumbel_top_k(scores: torch.Tensor, k: torch.Tensor, alg_temp: float, u: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: k (B,) positions drawn without replacement with weights softmax(scores / alg_temp) ((B, L), -inf:
    never), as the k largest of scores / alg_temp + Gumbel(u) (u (B, L) uniforms; the Gumbel-top-k trick)."""
    gumbel = -torch.log(-torch.log(u.double().clamp(torch.finfo(torch.float64).tiny, 1 - 1e-16)))
    return _top_k(scores / alg_temp + gumbel, k)


@register_sampler("dream", DreamConfig, description="Dream's own sampler (origin / maskgit_plus / topk_margin / "
                  "entropy, alg_temp, its step schedule) and Fast-dLLM's block-wise Dream variant with its caches")
class DreamSampler(LLaDASampler):
    """Dream's `diffusion_generate` rule (module docstring), over any canvas; with block_length, Fast-dLLM's
    block-wise variant of a prompt's continuation (on the LLaDA sampler's block machinery)."""

    name = "dream"
    takes_feedback = True

    def __init__(self, steps: int = 512, alg: str = "origin", alg_temp: float | None = None, temperature: float = 0.0,
                 top_p: float | None = None, top_k: int | None = None, eps: float = 1e-3,
                 block_length: int | None = None, threshold: float = 0.9, cache: str = "none",
                 feedback: InputFeedback | None = None):
        DreamConfig(steps, alg, alg_temp, temperature, top_p, top_k, eps, block_length, threshold, cache)  # validates
        super().__init__(steps, block_length, temperature, cache=cache, feedback=feedback)
        self.alg, self.alg_temp, self.top_p, self.top_k, self.eps = alg, alg_temp, top_p, top_k, eps
        self.threshold = threshold

    # ------------------------------------------------------------------------------------ shared
    def _plan(self, gens, candidates, i, steps, first, valid=None):
        """Before a call: each row's step (B_a,) long moved past steps that would commit nothing, its count (B_a,)
        long and, for origin, its coins' verdict (B_a, L) bool. candidates (B_a, L): masked positions; steps (B_a,)
        long; first (B_a,) bool: rows at a block's first call (commit one position, never skipped)."""
        i = i.clone()
        n = candidates.sum(1)
        transfer = torch.zeros_like(candidates)
        if self.alg == "confidence_threshold":
            return i, n, transfer
        if self.alg != "origin":
            while True:
                count = torch.where(first, 1, transfer_count(n, i, steps, self.eps))
                skip = count == 0
                if not bool(skip.any()):
                    return i, count, transfer
                i = i + skip.long()
        todo = ~first
        while bool(todo.any()):  # a row's coins are drawn again at its next step while none of them lands
            sub = todo.nonzero().squeeze(1)
            u = rand_rows(generators_of(gens, sub.cpu()), (sub.numel(), candidates.shape[1]), candidates.device,
                          valid=None if valid is None else valid[sub])
            p = transfer_probability(i[sub], steps[sub], self.eps).to(u.device)
            hit = candidates[sub] & (u < p[:, None])
            transfer[sub] = hit
            empty = sub[~hit.any(1)]
            i[empty] += 1
            todo = torch.zeros_like(todo)
            todo[empty] = True
        transfer[first, 0] = True  # (block mode) the block's first position
        return i, transfer.sum(1), transfer

    def _commit(self, x_theta, candidates, first, count, transfer, gens, valid=None):
        """(predictions (B_a, L) long, commit (B_a, L) bool) of one call: x_theta (B_a, L, V) logits, candidates
        (B_a, L) masked positions, first (B_a,) rows committing their first position, count (B_a,) and transfer
        (B_a, L) from `_plan`, gens the rows' generators; valid (B_a, L): positions that draw (left padding does
        not)."""
        B, L = candidates.shape
        device = candidates.device
        u = rand_rows(gens, (B, L), device, torch.float64, valid) if self.temperature > 0 else None
        x0 = torch.zeros((B, L), dtype=torch.long, device=device)
        scores = torch.full((B, L), float("-inf"), dtype=torch.float64, device=device)
        if bool(candidates.any()):
            x0[candidates], scores[candidates] = predict(x_theta[candidates], None if u is None else u[candidates],
                                                         self.alg, self.temperature, self.top_p, self.top_k)
        if self.alg == "origin":
            return x0, transfer & candidates
        if self.alg == "confidence_threshold":
            commit = ConfidenceThreshold(self.threshold).select(scores, count, 0, 1)
        elif self.alg_temp:
            commit = torch.zeros_like(candidates)
            rest = (~first).nonzero().squeeze(1)
            if rest.numel():
                draws = rand_rows(generators_of(gens, rest.cpu()), (rest.numel(), L), device, torch.float64,
                                  None if valid is None else valid[rest])
                commit[rest] = gumbel_top_k(scores[rest], count[rest], self.alg_temp, draws)
        else:
            commit = _top_k(scores, count)
        commit[first] = False
        commit[first, 0] = True  # (block mode) the block's first position
        return x0, commit

    # ------------------------------------------------------------------------------------ Dream's rule
    @torch.no_grad()
    def start(self, network, process, canvas: Canvas, generator=None) -> SamplerState:
        """Any canvas (its masked positions to generate anywhere) for Dream's rule; a prompt's continuation (one
        suffix of the canvas, as the llada sampler) with block_length."""
        if self.block_length is not None:
            return self._start_blocks(network, process, canvas, generator)
        process.check_sampler(self)
        no = torch.zeros(canvas.shape[0], dtype=torch.bool, device=canvas.tokens.device)
        return SamplerState.begin(network, process, canvas, generator, self.steps, {"embeds": None, "fed": no})

    @torch.no_grad()
    def step(self, state: SamplerState) -> tuple[SamplerState, StepEvent]:
        """One call for every row with masks left: its step moved past those that commit nothing, then its commits."""
        if self.block_length is not None:
            return self._step_blocks(state)
        z, process, device = state.tokens, state.process, state.tokens.device
        noise = process.is_noise(z) & state.to_generate  # (B, L)
        state.done = state.done | ~noise.any(1)
        committed = torch.zeros_like(noise)
        confidence = torch.zeros(z.shape, device=device) if state.confidence else None
        if not bool(state.done.all()):
            rows = (~state.done).nonzero().squeeze(1)
            gens = generators_of(state.generators, rows.cpu())
            valid = None if state.key_valid is None else state.key_valid[rows]
            cand = noise[rows]
            steps = torch.full_like(rows, self.steps)
            no_first = torch.zeros_like(rows, dtype=torch.bool)
            i, count, transfer = self._plan(gens, cand, state.step[rows], steps, no_first, valid)
            t = None
            if process.time_conditioning:  # the time whose mask rate is the row's fraction of masks left
                t = process.time_of_mask_rate(masked_fraction(process, z, state.to_generate).double()).float()
            ex = state.extras
            raw = state.forward(rows, t, ex["embeds"], ex["fed"])  # (B_a, L, V)
            x_theta = process.denoise(raw)
            x0, commit = self._commit(x_theta, cand, no_first, count, transfer, gens, valid)
            commit = commit & cand
            z[rows] = torch.where(commit, x0, z[rows])
            committed[rows] = commit
            if confidence is not None:  # the committed predictions' probabilities under x_theta
                sub = torch.zeros_like(confidence[rows])
                sub[commit] = x_theta[commit].float().softmax(-1).gather(-1, x0[commit][:, None]).squeeze(-1)
                confidence[rows] = sub
            state.step[rows] = i + 1
            if self.feedback is not None:  # the next call's inputs from this call's logits
                masks_left = masked_fraction(process, z[rows], state.to_generate[rows])  # (B_a,)
                new = self.feedback(state.network, z[rows], raw, ~state.to_generate[rows], masks_left)
                if new is not None:
                    if ex["embeds"] is None:
                        ex["embeds"] = new.new_zeros((*z.shape, new.shape[-1]))
                    ex["embeds"][rows] = new.to(ex["embeds"].dtype)
                ex["fed"] = ex["fed"].index_fill(0, rows, new is not None)
            state.done = state.done | ~(process.is_noise(z) & state.to_generate).any(1)
        event = StepEvent(state.events, z, committed, confidence, state.calls, state.nfe_per_row.clone())
        state.events += 1
        return state, event

    # ------------------------------------------------------------------------------------ Fast-dLLM's blocks
    def _start_blocks(self, network, process, canvas, generator) -> SamplerState:
        state = LLaDASampler.start(self, network, process, canvas, generator)
        _, _, blocks, per_block = self._geometry(state)
        if self.alg != "confidence_threshold" and self.block_length > 1 and bool((per_block < 2).any()):
            raise ValueError(f"steps={self.steps} gives {int(per_block.min())} step per block of {self.block_length}: "
                             "Fast-dLLM's Dream variant spends a block's first call on its first position and needs "
                             f"at least one more; use steps >= {2 * int(blocks.max())}")
        B, T = canvas.shape
        state.extras["count"] = torch.zeros(B, dtype=torch.long, device=canvas.tokens.device)
        state.extras["transfer"] = torch.zeros((B, T), dtype=torch.bool, device=canvas.tokens.device)
        if self.alg == "confidence_threshold":
            state.num_steps = blocks * self.block_length
        return state

    def _step_blocks(self, state: SamplerState):
        """Plan each row's next call in its block (steps that commit nothing skipped), then the LLaDA sampler's
        step, whose `_choose` is Dream's."""
        active = self._advance(state)
        if bool(active.any()):
            ex = state.extras
            rows = active.nonzero().squeeze(1)
            start, _, _, per_block = self._geometry(state)
            b = self.block_length
            at = start[rows, None] + torch.arange(b, device=rows.device)  # (B_a, b) canvas index of each block slot
            cand = state.process.is_noise(state.tokens[rows].gather(1, at))
            step = ex["block_step"][rows]
            i, count, transfer = self._plan(generators_of(state.generators, rows.cpu()), cand, step, per_block[rows],
                                            step == 0)
            ex["block_step"] = ex["block_step"].index_copy(0, rows, i)
            ex["count"] = ex["count"].index_copy(0, rows, count)
            full = torch.zeros_like(ex["transfer"][rows]).scatter_(1, at, transfer)
            ex["transfer"] = ex["transfer"].index_copy(0, rows, full)
        return LLaDASampler.step(self, state)

    def _choose(self, state, rows, x_theta, candidates, per_block, block):
        ex, (start, end) = state.extras, block
        first = ex["block_step"][rows] == 0
        return self._commit(x_theta, candidates, first, ex["count"][rows], ex["transfer"][rows, start:end],
                            generators_of(state.generators, rows.cpu()))
