"""Unmasking policies: which of the current block's masked positions a step commits.

Every policy has one method, `select(confidence, n_masked_in_block, step_in_block, steps_per_block) -> commit`:

    confidence (B, L) float: the score of each candidate (a masked position of the current block); -inf
        marks positions that are not candidates and are never committed.
    n_masked_in_block (B,) long: candidates left in each row's block before this step.
    step_in_block: index of this step within the block (0-based); steps_per_block: the block's step budget.
    commit (B, L) bool: the positions to commit now. Always a subset of the candidates.

All are vectorised over the batch (a sort per step, no Python loop over rows).

The score ("confidence") is whatever ordering the sampler uses, always in [0, 1] (llada's `remasking`), so every
policy works with every ordering; what a threshold or factor then reads:

    low_confidence  p, the probability of the prediction: threshold t commits positions with p >= t.
    margin          p1 - p2 (top-1 minus top-2 probability): margin >= t, which implies p1 >= t, so at the same t
                    a margin threshold commits a subset of what the probability threshold commits.
    entropy         exp(-H), H the entropy of the prediction in nats (1 when certain, 1/V when uniform; the
                    same order as -H): exp(-H) >= t, i.e. H <= -ln t. exp(-H) <= p1, so again a subset.
    random          a uniform draw u in [0, 1), fresh at every step: the model is not consulted, so a threshold
                    t commits each candidate with probability 1 - t (and at least one per step), the factor rule a
                    random count. A model-blind baseline; for random order at a given number of calls use the
                    count schedule (steps).

The factor rule reads 1 - score as the error of committing a position (Fast-dLLM's 1 - p); with margin and
entropy scores that error is over-estimated (1 - margin >= 1 - p1), so it commits fewer positions per call.

- CountSchedule (LLaDA, arXiv 2502.09992): the k most confident, k from an even split of the block's masks
  over its steps, the remainder going to the first steps.
- ConfidenceThreshold (Fast-dLLM, arXiv 2505.22618): every candidate with confidence >= threshold, and at
  least the most confident one per step.
- FactorRule (Fast-dLLM): the n most confident for the largest n with (n' + 1)(1 - c_n') < factor for all
  n' <= n (c sorted in decreasing order), and at least one.
- EntropyBound (EB-sampler, Ben-Hamu et al. 2025, arXiv 2505.24857; DiffusionGemma's acceptance rule): in the
  order of the scores, the largest prefix whose entropies H (nats, of x_theta) satisfy
  sum_{i<=n} H_i - max_{i<=n} H_i <= entropy_bound (an upper bound on the mutual information between the tokens
  committed together), and at least one. It reads the entropies too (`needs_entropy`: the sampler passes
  `entropy=`); with remasking="entropy" the order is by entropy, DiffusionGemma's rule exactly.
"""

from __future__ import annotations

import torch


def _ranks(confidence: torch.Tensor) -> torch.Tensor:
    """(B, L) rank of each position when sorted by decreasing confidence (0 = most confident; ties: leftmost first)."""
    order = confidence.argsort(dim=1, descending=True, stable=True)  # (B, L)
    positions = torch.arange(confidence.shape[1], device=confidence.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _top_k(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the k[b] most confident candidates of each row (k (B,) long)."""
    return (_ranks(confidence) < k[:, None]) & (confidence > float("-inf"))


class UnmaskingPolicy:
    name = "base"

    def select(self, confidence: torch.Tensor, n_masked_in_block: torch.Tensor, step_in_block: int,
               steps_per_block: int) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in vars(self).items())})"


class CountSchedule(UnmaskingPolicy):
    """Commit the k most confident candidates, k = ceil(masks left / steps left).

    With exactly k committed at every step this reproduces LLaDA's `get_num_transfer_tokens`: the block's
    M masks are split over its S steps as M // S each, plus one for the first M % S steps. Computing k from
    what is left needs no state, so one object serves every block and every row.
    """

    name = "count"

    def select(self, confidence, n_masked_in_block, step_in_block, steps_per_block):
        steps_left = max(steps_per_block - step_in_block, 1)
        k = torch.div(n_masked_in_block + steps_left - 1, steps_left, rounding_mode="floor")  # ceil
        return _top_k(confidence, k)


def _at_least_one(commit: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """Add each row's most confident candidate where a row with candidates would otherwise commit nothing."""
    has_candidate = (confidence > float("-inf")).any(1)
    best = torch.zeros_like(commit).scatter_(1, confidence.argmax(1, keepdim=True), True)
    return commit | (best & (has_candidate & ~commit.any(1))[:, None])


class ConfidenceThreshold(UnmaskingPolicy):
    """Commit every candidate whose confidence is >= threshold; at least the most confident one per step."""

    name = "threshold"

    def __init__(self, threshold: float = 0.9):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold={threshold} must be in (0, 1]: scores are probabilities or other numbers "
                             "in [0, 1] (1 = one token per step unless the model is certain)")
        self.threshold = threshold

    def select(self, confidence, n_masked_in_block, step_in_block, steps_per_block):
        return _at_least_one(confidence >= self.threshold, confidence)


class FactorRule(UnmaskingPolicy):
    """Commit the n most confident candidates while (n + 1)(1 - c_n) < factor (c_1 >= c_2 >= ...), at least one.

    Fast-dLLM's factor-based parallel decoding: the more tokens are committed at once, the more confident
    each must be (the bound on the joint error of n tokens grows like n times the worst marginal error).
    """

    name = "factor"

    def __init__(self, factor: float = 1.0):
        if factor <= 0:
            raise ValueError(f"factor={factor} must be > 0 (larger commits more tokens per step; 1.0 is typical)")
        self.factor = factor

    def select(self, confidence, n_masked_in_block, step_in_block, steps_per_block):
        sorted_conf = confidence.sort(dim=1, descending=True).values  # (B, L)
        n = torch.arange(1, confidence.shape[1] + 1, device=confidence.device, dtype=sorted_conf.dtype)
        ok = ((n + 1) * (1 - sorted_conf) < self.factor) & (sorted_conf > float("-inf"))  # (B, L)
        k = ok.long().cumprod(1).sum(1)  # length of the leading run that satisfies the rule
        return _at_least_one(_top_k(confidence, k), confidence)


class EntropyBound(UnmaskingPolicy):
    """Commit the longest run of candidates, in decreasing score, with sum(H) - max(H) <= entropy_bound over it
    (H: each candidate's entropy in nats, `entropy=` (B, L)); at least the most confident one per step."""

    name = "entropy_bound"
    needs_entropy = True

    def __init__(self, entropy_bound: float = 0.1):
        if not entropy_bound > 0:
            raise ValueError(f"entropy_bound={entropy_bound} must be > 0 nats (EB-sampler and DiffusionGemma: 0.1; "
                             "larger commits more tokens per step)")
        self.entropy_bound = entropy_bound

    def select(self, confidence, n_masked_in_block, step_in_block, steps_per_block, entropy=None):
        if entropy is None:
            raise ValueError("the entropy-bound policy needs the candidates' entropies (entropy=)")
        order = confidence.argsort(dim=1, descending=True, stable=True)  # (B, L)
        valid = confidence.gather(1, order) > float("-inf")
        h = entropy.gather(1, order).masked_fill(~valid, 0.0)
        ok = ((h.cumsum(1) - h.cummax(1).values) <= self.entropy_bound) & valid  # sum - max only grows along a row
        k = ok.long().cumprod(1).sum(1)
        return _at_least_one(_top_k(confidence, k), confidence)


def make_policy(threshold: float | None = None, factor: float | None = None,
                entropy_bound: float | None = None) -> UnmaskingPolicy:
    """The count schedule by default; a confidence threshold, the factor rule or the entropy bound when given (one
    of them)."""
    if sum(x is not None for x in (threshold, factor, entropy_bound)) > 1:
        raise ValueError("give one of threshold= (confidence-threshold decoding), factor= (factor rule) and "
                         "entropy_bound= (entropy-bound rule), not several")
    if entropy_bound is not None:
        return EntropyBound(entropy_bound)
    if threshold is not None:
        return ConfidenceThreshold(threshold)
    if factor is not None:
        return FactorRule(factor)
    return CountSchedule()
