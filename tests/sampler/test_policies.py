"""Unmasking policies: commit counts, subsets of the candidates, and batch rows that do not interact."""

import pytest
import torch

from dlm.sampler.policies import ConfidenceThreshold, CountSchedule, FactorRule, make_policy

NEG_INF = float("-inf")


def llada_num_transfer_tokens(n_masked: int, steps: int) -> list[int]:
    """LLaDA's get_num_transfer_tokens for one row: base = M // S per step, +1 for the first M % S steps."""
    base, rem = divmod(n_masked, steps)
    return [base + (1 if s < rem else 0) for s in range(steps)]


def run_block(policy, confidence: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Drive `policy` through a block whose candidates start as the finite entries of confidence (B, L)."""
    conf = confidence.clone()
    counts = []
    for step in range(steps):
        n_masked = (conf > NEG_INF).sum(1)
        commit = policy.select(conf, n_masked, step, steps)
        assert not (commit & (conf == NEG_INF)).any(), "committed a non-candidate"
        counts.append(commit.sum(1))
        conf = conf.masked_fill(commit, NEG_INF)
    return counts


@pytest.mark.parametrize("block,steps", [(16, 4), (16, 5), (7, 3), (4, 8), (10, 10)])
def test_count_schedule_splits_masks_evenly_with_the_remainder_first(block, steps):
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(3, block, generator=g, dtype=torch.float64)
    conf[1, : block // 2] = NEG_INF  # rows with fewer masks in the block get their own split
    conf[2, :] = NEG_INF
    conf[2, 0] = 0.5
    counts = torch.stack(run_block(CountSchedule(), conf, steps), 1)  # (B, steps)
    for row in range(3):
        m = int((conf[row] > NEG_INF).sum())
        assert counts[row].tolist() == llada_num_transfer_tokens(m, steps)


def test_count_schedule_commits_the_most_confident():
    conf = torch.tensor([[0.1, 0.9, NEG_INF, 0.5, 0.7], [0.3, 0.2, 0.1, NEG_INF, NEG_INF]], dtype=torch.float64)
    commit = CountSchedule().select(conf, torch.tensor([4, 3]), 0, 2)  # k = ceil(4/2) = 2, ceil(3/2) = 2
    assert commit.tolist() == [[False, True, False, False, True], [True, True, False, False, False]]


def test_threshold_commits_all_above_and_at_least_one():
    conf = torch.tensor([[0.95, 0.9, 0.89, NEG_INF], [0.2, 0.5, 0.1, NEG_INF], [NEG_INF] * 4], dtype=torch.float64)
    commit = ConfidenceThreshold(0.9).select(conf, (conf > NEG_INF).sum(1), 0, 4)
    assert commit.tolist() == [[True, True, False, False], [False, True, False, False], [False] * 4]


def test_threshold_count_on_random_confidences():
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(64, 12, generator=g, dtype=torch.float64)
    conf[torch.rand(64, 12, generator=g) < 0.3] = NEG_INF
    commit = ConfidenceThreshold(0.7).select(conf, (conf > NEG_INF).sum(1), 0, 4)
    above = (conf >= 0.7).sum(1)
    has = (conf > NEG_INF).any(1)
    expected = torch.where(above > 0, above, has.long())
    assert torch.equal(commit.sum(1), expected)
    assert (conf[commit] >= 0.7).sum() == above.sum()  # every committed token is above, except the forced ones


def factor_reference(conf_row: list[float], factor: float) -> int:
    """Number of tokens the factor rule commits, by a plain loop over the sorted confidences."""
    c = sorted((v for v in conf_row if v != NEG_INF), reverse=True)
    n = 0
    while n < len(c) and (n + 2) * (1 - c[n]) < factor:  # (n' + 1)(1 - c_n') with n' = n + 1
        n += 1
    return max(n, 1) if c else 0


@pytest.mark.parametrize("factor", [0.5, 1.0, 2.0, 4.0])
def test_factor_rule_matches_a_row_by_row_loop(factor):
    g = torch.Generator().manual_seed(2)
    conf = 1 - torch.rand(128, 10, generator=g, dtype=torch.float64) ** 3  # mostly confident
    conf[torch.rand(128, 10, generator=g) < 0.2] = NEG_INF
    conf[0] = NEG_INF
    commit = FactorRule(factor).select(conf, (conf > NEG_INF).sum(1), 0, 4)
    for row in range(conf.shape[0]):
        k = factor_reference(conf[row].tolist(), factor)
        assert int(commit[row].sum()) == k
        if k:  # the committed ones are the k most confident
            assert conf[row][commit[row]].min() >= conf[row][~commit[row]].max()


def test_factor_rule_example():
    # sorted: 0.99, 0.8, 0.7; n=1: 2*0.01 < 1; n=2: 3*0.2 = 0.6 < 1; n=3: 4*0.3 = 1.2 >= 1 -> commit 2
    conf = torch.tensor([[0.7, 0.99, NEG_INF, 0.8]], dtype=torch.float64)
    assert FactorRule(1.0).select(conf, torch.tensor([3]), 0, 1).tolist() == [[False, True, False, True]]


@pytest.mark.parametrize("policy", [CountSchedule(), ConfidenceThreshold(0.6), FactorRule(1.5)])
def test_rows_are_independent(policy):
    """The batch is vectorised: selecting for a batch equals selecting for each row alone."""
    g = torch.Generator().manual_seed(3)
    conf = torch.rand(8, 9, generator=g, dtype=torch.float64)
    conf[torch.rand(8, 9, generator=g) < 0.4] = NEG_INF
    n = (conf > NEG_INF).sum(1)
    together = policy.select(conf, n, 1, 3)
    alone = torch.cat([policy.select(conf[i:i + 1], n[i:i + 1], 1, 3) for i in range(8)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_threshold_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match=r"threshold=.*\(0, 1\]"):
        ConfidenceThreshold(bad)


def test_make_policy():
    assert isinstance(make_policy(), CountSchedule)
    assert make_policy(threshold=0.8).threshold == 0.8
    assert make_policy(factor=2.0).factor == 2.0
    with pytest.raises(ValueError, match="not several"):
        make_policy(threshold=0.9, factor=1.0)
    with pytest.raises(ValueError, match="factor"):
        FactorRule(0.0)
