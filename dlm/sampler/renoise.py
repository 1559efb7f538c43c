"""The renoising sampler of DiffusionGemma (transformers' `DiffusionGemmaForBlockDiffusion.generate`), `renoise`.

Nothing stays committed: each step redraws the whole canvas and keeps only the part the model is sure of.

    canvas: the positions to generate hold the process's prior (uniform tokens; [MASK] for an absorbing process)
    for step n = N, N-1, ..., 1 (N = max_denoising_steps; n counts the steps left, as transformers' cur_step):
        temperature T_n = t_min + (t_max - t_min) * n / N          (t_max at the first step, t_min + (t_max-t_min)/N last)
        logits = denoise(network(canvas, previous prediction)) / T_n     (self-conditioning: feedback=)
        candidate x_D ~ softmax(logits) at every generated position; entropy H_i of softmax(logits)
        accept (entropy_bound_accept): sort H ascending; accept the k lowest for every k with
            sum_{i<=k} H_(i) - max_{i<=k} H_(i) = sum_{i<k} H_(i) <= entropy_bound
            (computed as cumsum - sorted, as transformers does; the lowest is always accepted)
        next canvas: x_D where accepted, a fresh prior draw everywhere else (renoise; absorbing: remask)
        argmax canvas: argmax of logits at every generated position (what is emitted)
        stop the row (stable_and_confident) when its argmax canvas equals each of the last `stability_threshold`
            argmax canvases and the mean entropy over its generated positions < confidence_threshold
    emit the argmax canvas of the row's last step.

Acceptance is recomputed over the whole canvas at every step. An absorbing process's denoiser has SUBS carry-over: a
clean (unmasked) position predicts its own token with certainty (entropy 0), so under this rule a clean token is
re-accepted at every step and renoise = remask touches only positions that are still [MASK]: the entropy-bound
(EB) sampler of Ben-Hamu et al. 2025. A row of an absorbing process is also done when no [MASK] is left (one more
step would change nothing; its canvas is then its argmax canvas).

What the state holds (`start` / `step`, dlm.sampler.state): `tokens` is the argmax canvas (what events show, what
the blockwise wrapper appends to its context, what the row emits); `extras["canvas"]` the noisy canvas the network
reads, `extras["history"]` (B, L, stability_threshold) the last argmax canvases, `extras["embeds"]` / `["fed"]`
the feedback inputs, `extras["rate"]` (B,) the fraction of generated positions renoised by the last step (a
time-conditioned network is fed the time whose noise rate 1 - alpha_t equals it; 1 at the start).

Options have DiffusionGemma's names and defaults (transformers' DiffusionGemmaGenerationConfig):
max_denoising_steps 48, t_max 0.8, t_min 0.4, entropy_bound 0.1, stability_threshold 1, confidence_threshold 0.005
(either of the last two None: no adaptive stopping, every row takes max_denoising_steps). The canvas is what the
sampler is given: for a block-causal process the blockwise wrapper runs it on each block of `block_length` tokens
(DiffusionGemma's `canvas_length`, 256) with the finished blocks in its KV cache, each block with the full
max_denoising_steps; for any other process one canvas of the generation length.

Differences from transformers (docs/renoise.md): candidates are drawn by inverse CDF in float64 from each row's own
generator (transformers: torch.multinomial from the global generator), renoise tokens come from `process.prior`
(transformers: torch.randint over the vocabulary, the same distribution for a uniform process), entropies are in
float32 over the generated positions only (a prompt inside the canvas is neither ranked nor renoised), and a row
that stops leaves the batch's calls (transformers keeps computing it and discards the result).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.sampler.base import Canvas, InputFeedback, SampleOutput, Sampler, StepEvent, generators_of, sample_tokens
from dlm.sampler.registry import register_sampler
from dlm.sampler.state import SamplerState


@dataclass
class RenoiseConfig:
    max_denoising_steps: int = 48  # steps per canvas at most (adaptive stopping may end a row sooner)
    t_max: float = 0.8  # temperature at the first step
    t_min: float = 0.4  # temperature approached at the last step
    entropy_bound: float = 0.1  # nats: the accepted set's entropy sum minus its largest entropy stays below it
    stability_threshold: int | None = 1  # steps the argmax canvas must stay the same (None: no adaptive stopping)
    confidence_threshold: float | None = 0.005  # mean entropy (nats) below which a stable row stops (None: no stop)
    feedback: InputFeedback | None = None  # self-conditioning (or soft-masking): the previous prediction as input

    def __post_init__(self):
        steps = self.max_denoising_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"max_denoising_steps={steps!r} must be a positive integer (DiffusionGemma uses 48)")
        if not 0.0 < self.t_min < self.t_max:
            raise ValueError(f"need 0 < t_min < t_max, got t_min={self.t_min}, t_max={self.t_max} (DiffusionGemma: "
                             "t_min 0.4, t_max 0.8)")
        if not self.entropy_bound > 0:
            raise ValueError(f"entropy_bound={self.entropy_bound} must be > 0 nats (DiffusionGemma uses 0.1)")
        k = self.stability_threshold
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"stability_threshold={k!r} must be an integer >= 0, or None (no adaptive stopping)")
        if self.confidence_threshold is not None and not self.confidence_threshold > 0:
            raise ValueError(f"confidence_threshold={self.confidence_threshold} must be > 0 nats, or None (no "
                             "adaptive stopping)")


@dataclass
class RenoiseOutput(SampleOutput):
    """`sample`'s result: the argmax canvases; tokens_per_forward (B,) float: each row's generated tokens per network
    call it took part in (DiffusionGemma's `tokens_per_forward`)."""

    tokens_per_forward: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------ the rule, step by step
def temperature_at(steps_left, max_denoising_steps: int, t_min: float, t_max: float):
    """T = t_min + (t_max - t_min) * n / N at n steps left (n = N at the first step, 1 at the last)."""
    return t_min + (t_max - t_min) * (steps_left / max_denoising_steps)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(...,) entropy in nats of softmax(logits (..., V)), in the logits' dtype: -sum p log p with log p the
    normalised logits (clamped to the dtype's lowest finite value, so a -inf logit contributes 0), p their softmax
    (the same operations as torch.distributions.Categorical.entropy, which transformers uses)."""
    log_p = logits - logits.logsumexp(-1, keepdim=True)
    return -(log_p.clamp(min=torch.finfo(log_p.dtype).min) * log_p.softmax(-1)).sum(-1)


def entropy_bound_accept(h: torch.Tensor, candidates: torch.Tensor, bound: float) -> torch.Tensor:
    """(B, L) bool: the accepted positions. h (B, L) entropies; candidates (B, L) bool: the positions ranked (others
    are never accepted). Sorted ascending (stable: ties leftmost first), the k lowest are accepted while
    cumsum_k - H_k (= the sum of the k - 1 below, = sum_{i<=k} H_i - max_{i<=k} H_i) <= bound; the lowest always
    is (a row with a candidate accepts at least one)."""
    ranked = h.masked_fill(~candidates, float("inf"))
    ordered, order = ranked.sort(dim=1, stable=True)  # (B, L)
    finite = torch.isfinite(ordered)
    ordered = ordered.masked_fill(~finite, 0.0)
    ok = ((ordered.cumsum(1) - ordered) <= bound) & finite
    return torch.zeros_like(candidates).scatter(1, order, ok)


def stable_and_confident(history: torch.Tensor, argmax: torch.Tensor, mean_entropy: torch.Tensor,
                         where: torch.Tensor, confidence_threshold: float) -> torch.Tensor:
    """(B,) bool: rows whose argmax canvas (B, L) equals every earlier one in history (B, L, k) at the positions
    `where` (B, L) bool (k = 0: always stable), and whose mean entropy (B,) < confidence_threshold."""
    same = (history == argmax[..., None]) | ~where[..., None]  # (B, L, k)
    return same.all(1).all(-1) & (mean_entropy < confidence_threshold)


# ------------------------------------------------------------------------------------------ the sampler
@register_sampler("renoise", RenoiseConfig,
                  description="DiffusionGemma's renoising sampler: draw every position, accept the lowest-entropy "
                              "ones under an entropy bound, renoise the rest; adaptive stopping, argmax canvas out")
class RenoiseSampler(Sampler):
    name = "renoise"
    corruptions = ("uniform", "absorbing")
    takes_feedback = True

    @property
    def adaptive(self) -> bool:
        return self.stability_threshold is not None and self.confidence_threshold is not None

    @torch.no_grad()
    def start(self, network, process, canvas: Canvas, generator=None) -> SamplerState:
        """Every row at its first step; its argmax canvas is the canvas it was given (the prior where generated)."""
        process.check_sampler(self)
        z = canvas.tokens
        B, L = z.shape
        k = self.stability_threshold if self.adaptive else 0
        extras = {"canvas": z.clone(), "history": torch.full((B, L, k), -1, dtype=torch.long, device=z.device),
                  "embeds": None, "fed": torch.zeros(B, dtype=torch.bool, device=z.device),
                  "rate": torch.ones(B, dtype=torch.float64, device=z.device)}
        state = SamplerState.begin(network, process, canvas, generator, self.max_denoising_steps, extras)
        state.done = ~canvas.to_generate.any(1)  # a row with nothing to generate is done
        if process.corruption == "absorbing":
            state.done = state.done | ~(process.is_noise(z) & canvas.to_generate).any(1)
        return state

    def _time(self, process, rate: torch.Tensor) -> torch.Tensor:
        """(B,) float32 network times: noise rate 1 - alpha_t = the fraction renoised (time-conditioned only)."""
        if not getattr(process, "time_conditioning", False):
            return rate.float()  # not read by the network
        eps = float(getattr(process, "sampling_eps", 1e-3))
        return process.time_of_mask_rate(rate.cpu()).clamp(eps, 1.0).float().to(rate.device)

    @torch.no_grad()
    def step(self, state: SamplerState) -> tuple[SamplerState, StepEvent]:
        """One denoising step of every row not done (rows may be at different steps: each has its temperature)."""
        network, process, ex = state.network, state.process, state.extras
        B, L = state.tokens.shape
        device = state.tokens.device
        absorbing = process.corruption == "absorbing"
        rows = (~state.done).nonzero().squeeze(1)  # (B_a,)
        if rows.numel() == 0:  # every row done: a step that does nothing
            event = StepEvent(state.events, state.tokens, torch.zeros(B, L, dtype=torch.bool, device=device), None,
                              state.calls, state.nfe_per_row.clone())
            state.events += 1
            return state, event
        canvas, gen = ex["canvas"][rows], state.to_generate[rows]  # (B_a, L)
        N = self.max_denoising_steps
        steps_left = (N - state.step[rows]).float()  # (B_a,) n = N .. 1
        temperature = temperature_at(steps_left, N, self.t_min, self.t_max)  # (B_a,) float32, as transformers
        view = _with_tokens(state, ex["canvas"])  # the network reads the noisy canvas
        raw = view.forward(rows, self._time(process, ex["rate"]), ex["embeds"], ex["fed"])  # (B_a, L, V)
        state.calls = view.calls
        logits = process.denoise(raw) / temperature[:, None, None]  # (B_a, L, V) float32, processed
        h = entropy(logits)  # (B_a, L)
        u = state.rand(rows, (L,), torch.float64, per_position=True)  # (B_a, L)
        draw = sample_tokens(logits.flatten(0, 1), u.flatten()).view_as(canvas)  # candidates x_D
        argmax = logits.argmax(-1)
        carried = gen & ~process.is_noise(canvas) if absorbing else torch.zeros_like(gen)  # SUBS carry-over
        h = h.masked_fill(carried, 0.0)
        draw, argmax = torch.where(carried, canvas, draw), torch.where(carried, canvas, argmax)
        accepted = entropy_bound_accept(h, gen, self.entropy_bound)  # (B_a, L)
        renoise = gen & ~accepted
        fresh = process.prior(canvas, renoise, generators_of(state.generators, rows.cpu()))
        new_canvas = torch.where(accepted, draw, fresh)  # given positions: fresh == canvas there
        argmax = torch.where(gen, argmax, canvas)
        # stopping, per row
        step_no = state.step[rows] + 1
        stop = step_no >= N
        if self.adaptive:
            mean_h = torch.where(gen, h, 0.0).sum(1) / gen.sum(1).clamp(min=1)
            stop = stop | stable_and_confident(ex["history"][rows], argmax, mean_h, gen, self.confidence_threshold)
            if self.stability_threshold:
                ex["history"][rows] = torch.cat((ex["history"][rows, :, 1:], argmax[..., None]), -1)
        out = argmax
        if absorbing:  # no [MASK] left: nothing can change any more, the canvas is the argmax canvas
            filled = ~(process.is_noise(new_canvas) & gen).any(1)
            out = torch.where(filled[:, None], new_canvas, argmax)
            stop = stop | filled
        # feedback: the processed logits (temperature-scaled, as DiffusionGemma feeds them) become the next inputs
        if self.feedback is not None:
            left = renoise.sum(1).double() / gen.sum(1).clamp(min=1)
            given = self.feedback(network, new_canvas, logits, ~gen, left.float())
            if given is None:
                ex["fed"] = ex["fed"].index_fill(0, rows, False)
            else:
                if ex["embeds"] is None:
                    ex["embeds"] = given.new_zeros((B, L, given.shape[-1]))
                ex["embeds"][rows] = given.to(ex["embeds"].dtype)
                ex["fed"] = ex["fed"].index_fill(0, rows, True)
        ex["canvas"][rows] = new_canvas
        ex["rate"][rows] = renoise.sum(1).double() / gen.sum(1).clamp(min=1)
        state.tokens[rows] = out
        state.step = state.step.index_add(0, rows, torch.ones_like(rows))
        state.done = state.done.index_copy(0, rows, stop)
        committed = torch.zeros(B, L, dtype=torch.bool, device=device)
        committed[rows] = accepted & ~carried
        confidence = None
        if state.confidence:
            confidence = torch.zeros(B, L, device=device)
            prob = logits.softmax(-1).gather(-1, draw[..., None]).squeeze(-1)
            confidence[rows] = torch.where(accepted & ~carried, prob, 0.0)
        event = StepEvent(state.events, state.tokens, committed, confidence, state.calls, state.nfe_per_row.clone())
        state.events += 1
        return state, event

    def output(self, state: SamplerState, stopped: torch.Tensor) -> RenoiseOutput:
        """The argmax canvases, calls, and each row's generated tokens per call (tokens_per_forward)."""
        per_row = state.nfe_per_row.cpu()
        generated = state.to_generate.sum(1).cpu().double()
        return RenoiseOutput(state.tokens, state.calls, per_row, stopped, state.tokens_computed.cpu(),
                             tokens_per_forward=generated / per_row.clamp(min=1))


def _with_tokens(state: SamplerState, tokens: torch.Tensor) -> SamplerState:
    """A view of the state whose network input is `tokens` (B, L) (its counters shared: nfe_per_row and
    tokens_computed are the same tensors; `calls` is copied back by the caller)."""
    from dataclasses import replace

    return replace(state, tokens=tokens)
