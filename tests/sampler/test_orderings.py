"""Every ordering (llada's `remasking`) with every commit policy (count schedule, threshold, factor), on a tiny
canvas and a stand-in network whose predictions are fixed per position: the prompt never changes, every mask is
filled, commits follow the ordering's score (computed here from first principles), and a threshold or factor reads
each score as documented in dlm.sampler.policies (margin p1 - p2, entropy exp(-H), random a uniform draw)."""

import math

import pytest
import torch

from dlm.process import MaskedDiffusion, make_schedule
from dlm.sampler.llada import REMASKING, LLaDASampler
from dlm.sampler.policies import ConfidenceThreshold, CountSchedule, FactorRule
from tests.toy_canvas import sample

V, MASK, N = 8, 7, 8  # vocabulary (the last id is [MASK]), positions to generate
PROMPT = [0, 3, 5]
T = len(PROMPT) + N


def designed_probs() -> torch.Tensor:
    """(N, V - 1) float64: one distribution over the clean tokens per generated position, chosen so that the
    three model-based orderings rank the positions differently."""
    rows = [[0.50, 0.50, 0, 0, 0, 0, 0],  # p1 high-ish, margin 0, low entropy
            [0.45, 0.11, 0.11, 0.11, 0.11, 0.11, 0],  # lower p1, large margin, high entropy
            [0.97, 0.01, 0.01, 0.01, 0, 0, 0],  # confident on every score
            [0.30, 0.30, 0.30, 0.10, 0, 0, 0],
            [0.60, 0.40, 0, 0, 0, 0, 0],
            [0.70, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05],
            [0.40, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10],
            [0.88, 0.12, 0, 0, 0, 0, 0]]
    p = torch.tensor(rows, dtype=torch.float64) + 1e-6  # no exact zeros: finite logits
    return p / p.sum(1, keepdim=True)


PROBS = designed_probs()


def scores(remasking: str) -> torch.Tensor:
    """(N,) each position's score, from the definitions (not from the sampler's code)."""
    top = PROBS.sort(1, descending=True).values
    if remasking == "low_confidence":
        return top[:, 0]
    if remasking == "margin":
        return top[:, 0] - top[:, 1]
    entropy = -(PROBS * PROBS.log()).sum(1)
    return torch.exp(-entropy)


class Fixed(torch.nn.Module):
    """Logits that do not depend on the canvas: position j of the generation gets log PROBS[j] (prompt positions
    get zeros, [MASK] a large negative logit that SUBS removes anyway)."""

    def __init__(self):
        super().__init__()
        logits = torch.zeros(T, V)
        logits[len(PROMPT):, :MASK] = PROBS.log().float()
        self.register_buffer("logits", logits)

    def forward(self, input_ids=None, logits_at=None, **kw):
        out = self.logits[None].expand(input_ids.shape[0], -1, -1)
        return out if logits_at is None else out[:, logits_at]


def run(remasking, policy, steps=N, B=1, seed=0, block_length=None):
    canvas = torch.tensor([PROMPT + [MASK] * N] * B)
    sampler = LLaDASampler(steps=steps, block_length=block_length, remasking=remasking, policy=policy)
    return sample(sampler, Fixed(), MaskedDiffusion(make_schedule("loglinear", 1e-3), MASK), canvas, canvas != MASK,
                  torch.Generator().manual_seed(seed), record_trajectory=True)


def commits_per_step(out) -> list[list[set[int]]]:
    """For each row, the generated positions committed at each step (from the trajectory)."""
    previous = torch.tensor([PROMPT + [MASK] * N] * out.tokens.shape[0])
    steps = []
    for canvas in out.trajectory:
        steps.append((previous[:, len(PROMPT):] == MASK) & (canvas[:, len(PROMPT):] != MASK))
        previous = canvas
    return [[set(s[b].nonzero().flatten().tolist()) for s in steps] for b in range(out.tokens.shape[0])]


POLICIES = [("count, 1 per call", CountSchedule(), N), ("count, 2 per call", CountSchedule(), N // 2),
            ("count, 4 per call", CountSchedule(), N // 4), ("threshold 0.5", ConfidenceThreshold(0.5), N),
            ("threshold 0.9", ConfidenceThreshold(0.9), N), ("factor 1", FactorRule(1.0), N),
            ("factor 3", FactorRule(3.0), N)]


def test_the_designed_positions_rank_differently_under_each_ordering():
    orders = {r: tuple(scores(r).argsort(descending=True).tolist()) for r in ("low_confidence", "margin", "entropy")}
    assert len(set(orders.values())) == 3


@pytest.mark.parametrize("remasking", REMASKING)
@pytest.mark.parametrize("label,policy,steps", POLICIES, ids=[p[0] for p in POLICIES])
def test_every_ordering_with_every_policy(remasking, label, policy, steps):
    out = run(remasking, policy, steps, B=3)
    assert (out.tokens[:, :len(PROMPT)] == torch.tensor(PROMPT)).all()  # the prompt never changes
    assert (out.tokens != MASK).all()  # every mask filled
    assert (out.tokens[:, len(PROMPT):] == PROBS.argmax(1)).all()  # temperature 0: the argmax everywhere
    assert out.nfe == len(out.trajectory) <= N
    if isinstance(policy, CountSchedule):
        assert out.nfe == steps and all(len(c) == N // steps for row in commits_per_step(out) for c in row)
    if remasking == "random":
        return
    s = scores(remasking)
    for row in commits_per_step(out):
        left = set(range(N))
        for committed in row:
            assert committed and committed <= left
            rest = left - committed
            if rest:  # the commit order follows the score: nothing committed later scores higher
                assert min(s[j] for j in committed) >= max(s[j] for j in rest)
            if isinstance(policy, ConfidenceThreshold):  # exactly the positions at or above it, else the best
                above = {j for j in left if s[j] >= policy.threshold}
                assert committed == (above or {max(left, key=lambda j: s[j])})
            if isinstance(policy, FactorRule):  # the leading run of (n + 1)(1 - c_n) < factor, at least one
                ranked = sorted(left, key=lambda j: -s[j])
                n = 0
                while n < len(ranked) and (n + 2) * (1 - s[ranked[n]]) < policy.factor:
                    n += 1
                assert committed == set(ranked[:max(n, 1)])
            left = rest


@pytest.mark.parametrize("remasking", REMASKING)
@pytest.mark.parametrize("label,policy,steps", POLICIES, ids=[p[0] for p in POLICIES])
def test_every_ordering_with_every_policy_in_two_blocks(remasking, label, policy, steps):
    """Blocks of 4: the second block's positions are committed only once the first is full, each block in the
    order of its own scores."""
    out = run(remasking, policy, steps, B=2, block_length=N // 2)
    assert (out.tokens[:, :len(PROMPT)] == torch.tensor(PROMPT)).all() and (out.tokens != MASK).all()
    s = scores(remasking) if remasking != "random" else None
    for row in commits_per_step(out):
        left = set(range(N))
        for committed in row:
            if not committed:  # this row's block is full; it waits for the other row's (random draws differ)
                continue
            block = set(range(N // 2)) if left & set(range(N // 2)) else set(range(N // 2, N))
            assert committed <= left & block
            rest = left & block - committed
            if s is not None and rest:
                assert min(s[j] for j in committed) >= max(s[j] for j in rest)
            left -= committed


def test_threshold_on_the_scores_that_are_not_probabilities():
    """margin >= t implies p1 >= t, and exp(-H) <= p1: at the same t both commit a subset of what the probability
    threshold commits (here a strict one: position 5 has p1 = 0.70 but margin 0.65 and exp(-H) = 0.32)."""
    first = {r: commits_per_step(run(r, ConfidenceThreshold(0.66)))[0][0]
             for r in ("low_confidence", "margin", "entropy")}
    assert first == {"low_confidence": {2, 5, 7}, "margin": {2, 7}, "entropy": {2, 7}}
    top = PROBS.sort(1, descending=True).values
    entropy = -(PROBS * PROBS.log()).sum(1)
    assert (torch.exp(-entropy) <= top[:, 0]).all() and float(entropy[2]) <= -math.log(0.66)


def test_random_order_is_uniform_and_blind_to_the_model():
    """Count schedule, one per call: the first committed position is uniform over the N positions (each row has its
    own draws); a threshold t commits each candidate with probability 1 - t."""
    B = 4000
    first = [min(row[0]) for row in commits_per_step(run("random", CountSchedule(), N, B=B))]
    counts = torch.bincount(torch.tensor(first), minlength=N).double()
    expected = B / N
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3  # chi-square, 7 degrees of freedom: P(chi2 > 24.3) = 0.001 under uniformity
    t = 0.75
    step0 = [len(row[0]) for row in commits_per_step(run("random", ConfidenceThreshold(t), N, B=B, seed=1))]
    # E[max(Binomial(N, 1 - t), 1)] = N (1 - t) + P(none) ; its standard error over B rows is below 0.03
    mean = N * (1 - t) + t ** N
    assert abs(sum(step0) / B - mean) < 0.1
