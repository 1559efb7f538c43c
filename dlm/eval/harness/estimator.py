"""The likelihood maths of the lm-evaluation-harness adapter, without lm_eval: what `loglikelihood` and
`loglikelihood_rolling` compute for one request, and `is_greedy`.

A request is a row of token ids `start + context + continuation` (start: BOS, or nothing for a tokenizer without
one) of which the first `n_given` are given: never noised, never scored. For a row, `score_rows` returns an
`Estimate` of log p(continuation | context): a float (nats) carrying its Monte Carlo standard error.

- Autoregressive process: exact, one causal call: the sum of the continuation tokens' log-probabilities;
  greedy when every continuation token is the argmax of its next-token distribution.
- Masked diffusion (MDLM-type: MDLM, soft-masking, self-conditioning — one plain pass of the denoiser, without
  their feedback —, open LLaDA-style folders), estimator "llada": the
  Monte Carlo bound of LLaDA (Nie et al. 2025, eq. 6 / its `get_log_likelihood`). A draw picks the number of
  masked continuation tokens l in 1..L (L = continuation length), masks l of the L positions uniformly and
  scores  (L / l) * sum over masked positions of -log x_theta(z)[x]  with the network on z (context clean).
  Its expectation is the continuous-time MDLM NELBO of the continuation given the context (for any schedule:
  ∫ (1/t) Binom(k; L, t) dt = 1/k), an upper bound on -log p. The mc_num draws are split into `mc_groups` groups;
  within a group the levels are stratified as LLaDA stratifies one batch: a random k in 1..L, then
  round(linspace(k, k + (b-1) L/b, b)) wrapped into 1..L (b = mc_num / mc_groups draws). The estimate is the mean
  of the group means and its standard error is their standard deviation / sqrt(mc_groups) (independent groups:
  an unbiased variance estimate under the stratification, which the iid formula over single draws is not).
  Every draw comes from the request's own generator, before any batching: results do not depend on batch_size.
- Any other process (BD3-LM, Eso-LM, uniform-state, SEDD), estimator "process": the process's own
  `nelbo(network, batch, mc_num / mc_groups, generators)` with the context given (the process contract: given
  positions are neither noised nor scored), called mc_groups times: the standard error is the spread of the calls
  / sqrt(mc_groups). Rows are batched
  with rows of the same length only (a process draws per padded position); a block-causal process's rows are
  right-padded to a multiple of its block size.

is_greedy for a masked diffusion model (`greedy_rows`): the continuation positions start masked and are
decoded one position per network call in confidence order (the masked position whose x_theta has the largest
top probability is committed, to its argmax), the context clean: greedy when every committed argmax equals the
continuation's token there. It stops at the first mismatch, so it costs between 1 and L calls per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dlm.progress import track


class Estimate(float):
    """A log-likelihood in nats (a float: lm_eval uses it as one) with `stderr` (its Monte Carlo standard error,
    0.0 when exact), `exact`, `tokens` (scored tokens) and `nfe` (network calls spent on it, row-calls)."""

    stderr: float
    exact: bool
    tokens: int
    nfe: int

    def __new__(cls, value: float, stderr: float = 0.0, exact: bool = False, tokens: int = 0, nfe: int = 0):
        out = super().__new__(cls, value)
        out.stderr, out.exact, out.tokens, out.nfe = float(stderr), bool(exact), int(tokens), int(nfe)
        return out

    def __reduce__(self):  # pickles (lm_eval's request cache) with its attributes
        return (Estimate, (float(self), self.stderr, self.exact, self.tokens, self.nfe))


def add_estimates(parts: list[Estimate]) -> Estimate:
    """The sum of independent estimates (windows of one text): variances add."""
    return Estimate(sum(float(p) for p in parts), math.sqrt(sum(p.stderr ** 2 for p in parts)),
                    all(p.exact for p in parts), sum(p.tokens for p in parts), sum(p.nfe for p in parts))


@dataclass
class Row:
    """One request: ids (start + context + continuation) of which the first n_given are given; its generator."""

    ids: list[int]
    n_given: int
    generator: torch.Generator | None = None
    n_start: int = 0  # the start tokens (BOS) among the given ones: guidance masks the given ones after them

    @property
    def length(self) -> int:  # L: the continuation's tokens
        return len(self.ids) - self.n_given


# ---------------------------------------------------------------------------------------------- draws (LLaDA)
def stratified_levels(k: int, b: int, length: int) -> torch.Tensor:
    """(b,) long in 1..length: LLaDA's stratified numbers of masked tokens for one group of b draws, from k."""
    x = torch.round(torch.linspace(float(k), k + (b - 1) * (length / b), steps=b)).long()
    return ((x - 1) % length) + 1


def draw_masks(length: int, mc_num: int, mc_groups: int, generator: torch.Generator | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels (mc_num,) long, masks (mc_num, length) bool) of one request, group by group: per group one
    k = randint(1, length + 1), then for each of its b draws a permutation: mask = (arange(length) < l)[perm]."""
    b = mc_num // mc_groups
    levels, masks = [], []
    for _ in range(mc_groups):
        k = int(torch.randint(1, length + 1, (), generator=generator))
        group = stratified_levels(k, b, length)
        for level in group.tolist():
            perm = torch.randperm(length, generator=generator)
            masks.append((torch.arange(length) < level)[perm])
        levels.append(group)
    return torch.cat(levels), torch.stack(masks)


def check_mc(mc_num: int, mc_groups: int) -> None:
    if mc_groups < 2 or mc_num < mc_groups or mc_num % mc_groups:
        raise ValueError(f"mc_num={mc_num} must be a positive multiple of mc_groups={mc_groups}, and mc_groups >= 2 "
                         "(the standard error is the spread of the group means)")


# ---------------------------------------------------------------------------------------------- batching helpers
def padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), attention_mask (B, T) bool): rows right-padded to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    am = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long, device=device)
        am[i, :len(r)] = True
    return ids, am


def denoised_log_probs(process, network, z: torch.Tensor, am: torch.Tensor, at: torch.Tensor,
                       t: torch.Tensor | None) -> torch.Tensor:
    """(N, V) float32 log x_theta at the positions `at` (B, T) bool of z (B, T), through the process contract
    (`forward_logits`, then `denoise`), keys limited to `am` (B, T)."""
    logits = process.forward_logits(network, z, t, {"attention_mask": am}, logits_at=at)  # (N, V)
    return process.denoise(logits).log_softmax(-1)


def times_of(process, rate: torch.Tensor) -> torch.Tensor | None:
    """The time at which a fraction `rate` (B,) of tokens is masked, for a time-conditioned network; else None."""
    if not process.time_conditioning:
        return None
    return process.time_of_mask_rate(rate.double()).float()


# ---------------------------------------------------------------------------------------------- estimators
@torch.no_grad()
def llada_estimates(process, network, rows: list[Row], mc_num: int, mc_groups: int, batch_size: int,
                    pad_id: int, cfg_scale: float = 0.0, progress="off") -> list[Estimate]:
    """LLaDA's Monte Carlo bound of each row's continuation (module docstring); log-likelihoods (negated bounds).
    cfg_scale > 0: LLaDA's classifier-free guidance, logits u + (1 + cfg_scale)(c - u) with u the logits with the
    context masked (BOS kept); two calls per draw."""
    check_mc(mc_num, mc_groups)
    device, mask_id = next(network.parameters()).device, process.mask_id
    jobs = []  # (row index, draw index, z ids, level)
    for r, row in enumerate(rows):
        if row.length < 1:
            raise ValueError("a continuation of no tokens has no likelihood to estimate")
        levels, masks = draw_masks(row.length, mc_num, mc_groups, row.generator)
        ids = torch.tensor(row.ids)
        for d in range(mc_num):
            z = ids.clone()
            z[row.n_given:][masks[d]] = mask_id
            jobs.append((r, d, z.tolist(), int(levels[d])))
    values = torch.zeros(len(rows), mc_num, dtype=torch.float64)
    order = sorted(range(len(jobs)), key=lambda j: len(jobs[j][2]))  # similar lengths together: less padding
    for start in track(range(0, len(order), batch_size), "likelihood (llada draws)", progress):
        chunk = [jobs[j] for j in order[start:start + batch_size]]
        z, am = padded([c[2] for c in chunk], pad_id, device)
        x, _ = padded([rows[c[0]].ids for c in chunk], pad_id, device)
        at = (z == mask_id) & am  # (B, T): the masked continuation positions (context and BOS are never masked)
        lengths = torch.tensor([rows[c[0]].length for c in chunk], device=device, dtype=torch.float64)
        levels = torch.tensor([c[3] for c in chunk], device=device, dtype=torch.float64)
        t = times_of(process, levels / lengths)
        logp = denoised_log_probs(process, network, z, am, at, t)  # (N, V)
        if cfg_scale:
            zu = z.clone()
            for i, c in enumerate(chunk):
                zu[i, rows[c[0]].n_start:rows[c[0]].n_given] = mask_id
            logp_u = denoised_log_probs(process, network, zu, am, at, t)
            logp = (logp_u + (1.0 + cfg_scale) * (logp - logp_u)).log_softmax(-1)
        ce = -logp.gather(-1, x[at][:, None])[:, 0].double()  # (N,)
        row_of = at.nonzero()[:, 0]
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(0, row_of, ce)  # (B,)
        weighted = (sums * lengths / levels).cpu()
        for i, c in enumerate(chunk):
            values[c[0], c[1]] = weighted[i]
    out = []
    calls = mc_num * (2 if cfg_scale else 1)
    for r, row in enumerate(rows):
        means = values[r].view(mc_groups, -1).mean(1)  # (G,)
        out.append(Estimate(-float(means.mean()), float(means.std() / math.sqrt(mc_groups)), False, row.length, calls))
    return out


@torch.no_grad()
def process_estimates(process, network, rows: list[Row], mc_num: int, mc_groups: int, batch_size: int,
                      pad_id: int = 0, progress="off") -> list[Estimate]:
    """The process's own bound (`nelbo` with the context given): mc_groups calls of mc_num / mc_groups times each
    (the process's own time sampling within a call, e.g. MDLM's antithetic times), the standard error from the
    spread of the calls; rows batched with rows of the same length only, so each row's draws do not depend on its
    batch. A block-causal process gets its rows right-padded to a multiple of its block size (padding neither
    attended to nor scored)."""
    check_mc(mc_num, mc_groups)
    device = next(network.parameters()).device
    values = torch.zeros(len(rows), mc_groups, dtype=torch.float64)
    by_length: dict[int, list[int]] = {}
    for r, row in enumerate(rows):
        by_length.setdefault(len(row.ids), []).append(r)
    block = process.block_size if process.blockwise and process.block_size else 1
    for length, members in track(list(by_length.items()), "likelihood (process nelbo)", progress, unit="length"):
        width = -(-length // block) * block
        for start in range(0, len(members), batch_size):
            idx = members[start:start + batch_size]
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long, device=device)
            ids[:, :length] = torch.tensor([rows[r].ids for r in idx], device=device)
            real = (torch.arange(width, device=device) < length)[None, :].expand(len(idx), -1)  # (B, width)
            given = torch.arange(width, device=device)[None, :] < torch.tensor([rows[r].n_given for r in idx],
                                                                              device=device)[:, None]
            batch = {"input_ids": ids, "loss_mask": real.clone(), "given": given}
            if width > length:
                batch["attention_mask"] = real.clone()
            generators = [rows[r].generator for r in idx]
            for g in range(mc_groups):
                out = process.nelbo(network, batch, mc_num // mc_groups, generators)
                values[idx, g] = out.nll_per_row.double().cpu()
    return [Estimate(-float(v.mean()), float(v.std() / math.sqrt(mc_groups)), False, row.length, mc_num)
            for v, row in zip(values, rows)]


@torch.no_grad()
def exact_ar(process, network, rows: list[Row], batch_size: int, pad_id: int) -> list[tuple[Estimate, bool]]:
    """Autoregressive: (exact log p(continuation | context), greedy) of each row, one causal call per row."""
    device = next(network.parameters()).device
    out: list[tuple[Estimate, bool] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r].ids))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x, _ = padded([rows[r].ids for r in idx], pad_id, device)  # right padding: causal queries never see it
        at = torch.zeros(len(idx), x.shape[1] - 1, dtype=torch.bool, device=device)  # positions predicting the
        for i, r in enumerate(idx):                                                   # continuation's tokens
            at[i, rows[r].n_given - 1:len(rows[r].ids) - 1] = True
        logp = process.forward_logits(network, x[:, :-1], None, logits_at=at).float().log_softmax(-1)  # (N, V)
        target = x[:, 1:][at]  # (N,)
        lp = logp.gather(-1, target[:, None])[:, 0].double()  # (N,)
        hit = (logp.argmax(-1) == target).double()
        row_of = at.nonzero()[:, 0]
        sums = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(0, row_of, lp)
        hits = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(0, row_of, hit)
        for i, r in enumerate(idx):
            out[r] = (Estimate(float(sums[i]), 0.0, True, rows[r].length, 1), int(hits[i]) == rows[r].length)
    return out


@torch.no_grad()
def greedy_rows(process, network, rows: list[Row], batch_size: int, pad_id: int) -> tuple[list[bool], list[int]]:
    """(greedy, network calls) per row of a masked diffusion model: confidence-order decoding of the
    continuation, one position per call, the context clean (module docstring); stops at the first mismatch."""
    device, mask_id = next(network.parameters()).device, process.mask_id
    result, calls = [True] * len(rows), [0] * len(rows)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r].ids))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x, am = padded([rows[r].ids for r in idx], pad_id, device)
        z = x.clone()
        for i, r in enumerate(idx):
            z[i, rows[r].n_given:len(rows[r].ids)] = mask_id
        live = torch.ones(len(idx), dtype=torch.bool, device=device)
        while bool(live.any()):
            rows_live = live.nonzero()[:, 0]
            zl, aml = z[rows_live], am[rows_live]
            at = (zl == mask_id) & aml  # (B', T)
            rate = at.sum(1).double() / torch.tensor([rows[idx[i]].length for i in rows_live.tolist()],
                                                     dtype=torch.float64, device=device)
            logp = denoised_log_probs(process, network, zl, aml, at, times_of(process, rate))  # (N, V)
            conf, best = logp.max(-1)  # (N,)
            row_of, col_of = at.nonzero()[:, 0], at.nonzero()[:, 1]
            for j, i in enumerate(rows_live.tolist()):
                sel = row_of == j
                k = int(conf[sel].argmax())
                col, guess = int(col_of[sel][k]), int(best[sel][k])
                calls[idx[i]] += 1
                if guess != int(x[i, col]):
                    result[idx[i]], live[i] = False, False
                    continue
                z[i, col] = guess
                if not bool((z[i] == mask_id).any()):
                    live[i] = False
    return result, calls


def encode_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): the whole text encoded once and split after the context's tokens, with the
    context's trailing spaces moved to the continuation (as the harness's own causal models do)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [], encode(continuation)
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


def fit_context(start: list[int], ctx: list[int], cont: list[int], window: int) -> tuple[list[int], int]:
    """(row ids, n_given): start + context + continuation, the context cut from the left to fit `window` tokens;
    an error when the continuation alone does not fit."""
    room = window - len(start) - len(cont)
    if room < 0:
        raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's context of {window} "
                         "tokens; use loglikelihood_rolling (perplexity tasks) for long texts")
    ctx = ctx[len(ctx) - room:] if len(ctx) > room else ctx
    return start + ctx + cont, len(start) + len(ctx)


__all__ = ["Estimate", "Row", "add_estimates", "draw_masks", "stratified_levels", "llada_estimates",
           "process_estimates", "exact_ar", "greedy_rows", "encode_pair", "fit_context"]
