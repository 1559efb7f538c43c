"""Eso-LM's attention rules (dlm/process/esolm_mask.py) against brute-force definitions and small worked examples."""

import itertools

import pytest
import torch

from dlm.process.esolm_mask import (CAUSAL, CLEAN_BIDIRECTIONAL, chunk_mask, diffusion_allowed, diffusion_mask,
                                    sequential_allowed, sequential_mask, with_valid_keys)


def brute_diffusion(q: int, k: int, n: int, attention: str) -> bool:
    """From the words: the sorted sequence is clean places 0..n-1 then masks. causal: a token sees itself and every
    place before it. clean_bidirectional: a clean token sees every clean token; a mask sees every clean token, the
    masks before it and itself; a clean token never sees a mask."""
    if attention == CAUSAL:
        return k <= q
    q_clean, k_clean = q < n, k < n
    if q_clean:
        return k_clean
    return k_clean or k <= q


def brute_sequential(q: int, k: int, L: int, n: int, attention: str) -> bool:
    """[z0 ; x], both sorted (n clean places first). A z0 place sees itself (its own token or mask) and the x places
    before it; an x place sees the x places up to itself (causal), and with clean_bidirectional also every clean x
    place when it is clean itself. Nothing in x sees z0."""
    q_x, k_x = q >= L, k >= L
    qi, ki = q % L, k % L
    if not q_x:
        return (not k_x and ki == qi) or (k_x and ki < qi)
    if not k_x:
        return False
    return ki <= qi or (attention == CLEAN_BIDIRECTIONAL and qi < n and ki < n)


@pytest.mark.parametrize("attention", [CAUSAL, CLEAN_BIDIRECTIONAL])
def test_diffusion_rule_equals_its_brute_force_definition(attention):
    L = 7
    for n in range(L + 1):
        got = diffusion_mask(torch.tensor([n]), L, attention)[0, 0]
        want = torch.tensor([[brute_diffusion(q, k, n, attention) for k in range(L)] for q in range(L)])
        assert torch.equal(got, want), n


@pytest.mark.parametrize("attention", [CAUSAL, CLEAN_BIDIRECTIONAL])
def test_sequential_rule_equals_its_brute_force_definition(attention):
    L = 5
    for n in range(L + 1):
        got = sequential_mask(torch.tensor([n]), L, attention)[0, 0]
        want = torch.tensor([[brute_sequential(q, k, L, n, attention) for k in range(2 * L)] for q in range(2 * L)])
        assert torch.equal(got, want), n


def test_worked_example_of_the_diffusion_rules():
    """Two clean tokens then three masks (the paper's figure: clean first, masks after)."""
    causal = diffusion_mask(torch.tensor([2]), 5, CAUSAL)[0, 0].int().tolist()
    assert causal == [[1, 0, 0, 0, 0],
                      [1, 1, 0, 0, 0],
                      [1, 1, 1, 0, 0],
                      [1, 1, 1, 1, 0],
                      [1, 1, 1, 1, 1]]
    clean_bi = diffusion_mask(torch.tensor([2]), 5, CLEAN_BIDIRECTIONAL)[0, 0].int().tolist()
    assert clean_bi == [[1, 1, 0, 0, 0],
                        [1, 1, 0, 0, 0],
                        [1, 1, 1, 0, 0],
                        [1, 1, 1, 1, 0],
                        [1, 1, 1, 1, 1]]


def test_worked_example_of_the_sequential_rule():
    """L = 3, one clean token (sorted place 0) and two masks: [z0 ; x] = [c, m1, m2 ; c, x1, x2]. The mask m1 sees
    c (of x) and itself; m2 sees c, x1 and itself; x is causal."""
    got = sequential_mask(torch.tensor([1]), 3, CAUSAL)[0, 0].int().tolist()
    assert got == [[1, 0, 0, 0, 0, 0],
                   [0, 1, 0, 1, 0, 0],
                   [0, 0, 1, 1, 1, 0],
                   [0, 0, 0, 1, 0, 0],
                   [0, 0, 0, 1, 1, 0],
                   [0, 0, 0, 1, 1, 1]]
    clean_bi = sequential_mask(torch.tensor([2]), 3, CLEAN_BIDIRECTIONAL)[0, 0]
    assert bool(clean_bi[3, 4]) and bool(clean_bi[4, 3]) and not bool(clean_bi[3, 5])  # clean x places see each other


def test_rules_broadcast_per_row_and_hide_invalid_keys():
    n = torch.tensor([1, 3])
    masks = diffusion_mask(n, 4, CLEAN_BIDIRECTIONAL)
    assert masks.shape == (2, 1, 4, 4)
    for r in range(2):
        assert torch.equal(masks[r, 0], diffusion_mask(n[r:r + 1], 4, CLEAN_BIDIRECTIONAL)[0, 0])
    valid = torch.tensor([[True, True, True, False], [True] * 4])
    hidden = with_valid_keys(masks, valid)
    assert not hidden[0, 0, :3, 3].any() and bool(hidden[0, 0, 3, 3])  # a pad sees only itself among pads
    assert torch.equal(hidden[1], masks[1])


def test_causal_rule_ignores_the_clean_count_and_scalars_work():
    for q, k, n in itertools.product(range(4), range(4), range(5)):
        assert bool(diffusion_allowed(torch.tensor(q), torch.tensor(k), n, CAUSAL)) == (k <= q)
        assert bool(sequential_allowed(torch.tensor(q), torch.tensor(k), 4, n, CAUSAL)) == brute_sequential(
            q, k, 4, n, CAUSAL)


@pytest.mark.parametrize("attention", [CAUSAL, CLEAN_BIDIRECTIONAL])
def test_a_chunks_mask_is_the_rows_of_the_whole_mask(attention):
    """A sampler's call on places c .. c+n-1 over a cache of places 0 .. c-1 sees what those rows of the whole
    sorted sequence's mask see."""
    L = 7
    for clean, cached, new in itertools.product(range(L + 1), range(L), range(1, L)):
        if cached + new > L:
            continue
        whole = diffusion_mask(torch.tensor([clean]), L, attention)[0, 0]
        assert torch.equal(chunk_mask(cached, new, clean, attention)[0, 0], whole[cached:cached + new, :cached + new])
