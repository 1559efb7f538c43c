"""Eso-LM's process (dlm/process/esolm.py) against first principles: its limits (alpha0 = 1 is MDLM's bound with the
sorted denoiser; alpha0 = 0 is an autoregressive NLL), the rotary positions carried through the sort, the one-pass
sequential/any-order term against one pass per token, the schedule, the kappa split and the config's refusals."""

import pytest
import torch
import torch.nn.functional as F

from dlm.network.base import select_positions
from dlm.process import MaskedDiffusion, make_process
from dlm.process.base import ModelDescription
from dlm.process.esolm import EsoLM, EsoLMConfig, ScaledLogLinear, sort_order
from dlm.process.esolm_mask import CAUSAL, CLEAN_BIDIRECTIONAL
from dlm.process.mdlm import subs_logits
from dlm.process.schedules import LogLinearSchedule

V, MASK, L = 11, 10, 12


class PositionTable(torch.nn.Module):
    """A network without attention: the logits at a place are table[token] + pos_table[position]. Its output moves
    with the token and its rotary position, so sorting is invisible to it only if positions follow the tokens."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=g))
        self.pos_table = torch.nn.Parameter(torch.randn(64, V, generator=g))
        self.calls = []

    def forward(self, input_ids=None, inputs_embeds=None, t=None, attn_mask=None, causal=False, positions=None,
                kv_cache=None, cache_update=False, return_hidden=False, logits_at=None):
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T)
        self.calls.append(positions.expand(B, T).clone())
        return select_positions(self.table[input_ids] + self.pos_table[positions.expand(B, T)], logits_at)


def batch(B=4, seed=0, padded=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK, (B, L), generator=g)
    lm = torch.ones(B, L, dtype=torch.bool)
    lm[:, 0] = False  # BOS
    b = {"input_ids": ids, "loss_mask": lm}
    if padded:
        am = torch.ones(B, L, dtype=torch.bool)
        am[1, -4:] = False
        b["attention_mask"], b["loss_mask"] = am, lm & am
    return b


def esolm(alpha0=0.5, attention=CAUSAL, **kw):
    return EsoLM(MASK, alpha0, attention=attention, **kw)


# ------------------------------------------------------------------------------------------ limits
@pytest.mark.parametrize("attention", [CAUSAL, CLEAN_BIDIRECTIONAL])
def test_alpha0_1_is_mdlms_bound_and_loss_for_a_position_wise_network(attention):
    """alpha0 = 1: kappa = 1, the schedule is MDLM's log-linear one, z0 = x (no AR term), and a network whose logits
    depend only on (token, position) gives MDLM's numbers exactly: the sort, the gathered positions and the scatter
    back change nothing. (A wrong position gather would change every logit.)"""
    net, b = PositionTable(), batch()
    eso, mdlm = esolm(1.0, attention), MaskedDiffusion(LogLinearSchedule(1e-3), MASK)
    assert eso.kappa == 1.0
    for seed in range(3):  # one time each: Eso-LM then draws its sort keys, which MDLM has not
        gens = lambda: [torch.Generator().manual_seed(10 * seed + r) for r in range(4)]  # noqa: E731
        a, want = eso.nelbo(net, b, 1, gens()), mdlm.nelbo(net, b, 1, gens())
        assert torch.allclose(a.nll_per_row, want.nll_per_row, rtol=1e-6) and float(a.nll_sum) > 0
    la, lw = eso.loss(net, b, torch.Generator().manual_seed(5)), mdlm.loss(net, b, torch.Generator().manual_seed(5))
    assert float(la.loss.detach()) == pytest.approx(float(lw.loss.detach()), rel=1e-6)
    # the positions the network saw are those of the tokens it was fed: a permutation of each row's 0..L-1
    assert all(torch.equal(p.sort(1).values, torch.arange(L).expand_as(p)) for p in net.calls)
    assert any(not torch.equal(p, torch.arange(L).expand_as(p)) for p in net.calls)  # and really sorted


@torch.no_grad()
def brute_autoregressive_nll(net, x, lm):
    """-log p(x) of the AR model Eso-LM is at alpha0 = 0, one call per token: token l is predicted by a [MASK] at
    position l that attends to x^{<l} (causal) and itself."""
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for r in range(x.shape[0]):
        for pos in range(L):
            if not lm[r, pos]:
                continue
            inp = torch.cat((x[r, :pos], torch.tensor([MASK])))[None]
            logits = net(inp, causal=True)[0, -1]
            total[r] += float(F.cross_entropy(subs_logits(logits, MASK)[None], x[r, pos:pos + 1]))
    return total


@pytest.mark.parametrize("attention", [CAUSAL, CLEAN_BIDIRECTIONAL])
def test_alpha0_0_is_an_autoregressive_nll(tiny_network, attention):
    """alpha0 = 0: no MDM term, every scored token is masked in z0, the masks come in natural order: the bound is
    the exact NLL of the AR model 'predict token l from a [MASK] at l that sees x^{<l}', with no Monte Carlo noise
    (BOS is context; the padded row's pads are never seen)."""
    net, b = tiny_network(V), batch(B=3)
    eso = esolm(0.0, attention)
    assert eso.kappa == 0.0
    got = eso.nelbo(net, b, 2, torch.Generator().manual_seed(0))
    again = eso.nelbo(net, b, 1, torch.Generator().manual_seed(7))
    want = brute_autoregressive_nll(net, b["input_ids"], b["loss_mask"])
    assert torch.allclose(got.nll_per_row, want, rtol=1e-4) and torch.allclose(again.nll_per_row, want, rtol=1e-4)
    loss = eso.loss(net, b, torch.Generator().manual_seed(0))
    assert float(loss.loss.detach()) == pytest.approx(float(want.sum() / b["loss_mask"].sum()), rel=1e-4)


def test_the_bound_falls_between_its_limits_and_mixes_both_terms(tiny_network):
    """0 < alpha0 < 1: each row gets both terms; with no MDM rows (alpha0 = 0) it is the AR NLL, and the value at
    alpha0 = 0.5 differs from both limits."""
    net, b = tiny_network(V), batch(B=2, padded=False)
    vals = {a: float(esolm(a).nelbo(net, b, 4, torch.Generator().manual_seed(0)).nll_sum) for a in (0.0, 0.5, 1.0)}
    assert len(set(vals.values())) == 3 and all(v > 0 for v in vals.values())


# ------------------------------------------------------------------------------------------ one pass vs one per token
@pytest.mark.parametrize("seed", [0, 1])
def test_the_causal_one_pass_any_order_nll_equals_one_diffusion_pass_per_token(tiny_network, seed):
    """Causal attention: the 2L pass [masks ; x] gives, at each mask, exactly what the diffusion denoiser gives at the
    first mask of the sorted sequence whose clean tokens are those revealed before it (one pass per token)."""
    net, b = tiny_network(V, seed=seed), batch(B=3)
    eso = esolm(1.0, CAUSAL)
    ranks = eso.random_ranks(b["loss_mask"], torch.Generator().manual_seed(seed))
    one = eso.order_nll(net, b, ranks)
    per_token = eso.stepwise_order_nll(net, b, ranks)
    assert torch.allclose(one.float(), per_token.float(), rtol=1e-4)
    other = eso.order_nll(net, b, eso.random_ranks(b["loss_mask"], torch.Generator().manual_seed(seed + 9)))
    assert not torch.allclose(one.float(), other.float())  # the order matters


def test_the_sequential_term_is_the_any_order_nll_of_its_own_order(tiny_network):
    """The AR term of a z0 scores its masks in natural order after its clean tokens: the any-order NLL of the order
    (clean first, in the sort's order, then masks left to right), restricted to the masks."""
    net, b = tiny_network(V), batch(B=2, padded=False)
    eso = esolm(0.5, CAUSAL)
    g = torch.Generator().manual_seed(3)
    x, lm = b["input_ids"], b["loss_mask"]
    masked = (torch.rand(x.shape, generator=g) < 0.5) & lm
    keys = torch.rand(x.shape, generator=g)
    sigma, n = sort_order(~lm, masked, torch.ones_like(lm), keys)
    got = eso._masked_nll(net, x, masked, sigma, n, torch.ones_like(lm), torch.arange(L).expand_as(x))
    # one call per mask: the clean tokens in sigma's order, then x at the masks before it, then the mask itself
    with torch.no_grad():
        for r in range(2):
            want = 0.0
            order = sigma[r].tolist()
            for i, pos in enumerate(order):
                if not masked[r, pos]:
                    continue
                inp = torch.cat((x[r, order[:i]], torch.tensor([MASK])))[None]
                logits = net(inp, causal=True, positions=torch.tensor(order[:i + 1]))[0, -1]
                want += float(F.cross_entropy(subs_logits(logits, MASK)[None], x[r, pos:pos + 1]))
            assert float(got[r]) == pytest.approx(want, rel=1e-4)


# ------------------------------------------------------------------------------------------ parts
def test_sort_order_puts_context_first_clean_then_masks_then_padding():
    context = torch.tensor([[True, True, False, False, False, False]])
    masked = torch.tensor([[False, False, True, False, True, False]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    keys = torch.tensor([[0.9, 0.1, 0.5, 0.2, 0.3, 0.0]])
    sigma, n = sort_order(context, masked, valid, keys)
    assert sigma.tolist() == [[0, 1, 3, 2, 4, 5]] and n.tolist() == [3]
    sigma, _ = sort_order(context, masked, valid, keys, mask_keys=torch.tensor([[0, 0, 0.9, 0, 0.1, 0]]))
    assert sigma.tolist() == [[0, 1, 3, 4, 2, 5]]


def test_scaled_log_linear_schedule():
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    for a0 in (1.0, 0.5, 0.125):
        s = ScaledLogLinear(a0, 1e-3)
        assert float(s.alpha(torch.zeros(1, dtype=torch.float64))) == pytest.approx(a0)
        assert torch.allclose(s.loss_weight(t), -s.dalpha(t) / (1 - s.alpha(t)))
        h = 1e-6  # the derivative by finite differences
        assert torch.allclose(s.dalpha(t[1:-1]), (s.alpha(t[1:-1] + h) - s.alpha(t[1:-1] - h)) / (2 * h), atol=1e-6)
    assert torch.equal(ScaledLogLinear(1.0, 1e-3).loss_weight(t), 1.0 / t)  # MDLM's exactly
    assert torch.equal(ScaledLogLinear(0.0, 1e-3).loss_weight(t), torch.zeros_like(t))


def test_kappa_splits_the_rows_and_low_var_changes_only_the_training_weight(tiny_network, monkeypatch):
    net, b = tiny_network(V), batch(B=4, padded=False)
    eso = esolm(0.5)
    seen = []
    monkeypatch.setattr(eso, "diffusion_terms", lambda n, part, t, g, s, w: seen.append(("mdm", part["input_ids"].shape[0], t)) or torch.ones(part["input_ids"].shape[0]))
    monkeypatch.setattr(eso, "sequential_terms", lambda n, part, a, g: seen.append(("ar", part["input_ids"].shape[0], None)) or torch.ones(part["input_ids"].shape[0]))
    out = eso.loss(net, b, torch.Generator().manual_seed(0))
    assert [(k, n) for k, n, _ in seen] == [("mdm", 2), ("ar", 2)]
    t = seen[0][2]
    assert float((t[1] - t[0]).abs()) == pytest.approx(0.5 * (1 - 1e-3), abs=1e-6)  # antithetic over the MDM rows
    assert torch.allclose(out.nll_per_row, torch.full((4,), 2.0))  # each term over its share of the rows
    monkeypatch.undo()
    elbo = esolm(0.5).loss(net, b, torch.Generator().manual_seed(0))
    low = esolm(0.5, weight="low_var").loss(net, b, torch.Generator().manual_seed(0))
    assert float(elbo.loss.detach()) != float(low.loss.detach())
    assert float(esolm(0.5).nelbo(net, b, 2, torch.Generator().manual_seed(0)).nll_sum) == float(
        esolm(0.5, weight="low_var").nelbo(net, b, 2, torch.Generator().manual_seed(0)).nll_sum)


def test_the_two_variants_differ_and_alpha0_eval_sets_the_bound(tiny_network):
    net, b = tiny_network(V), batch(B=2, padded=False)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    causal, clean_bi = esolm(1.0, CAUSAL).nelbo(net, b, 2, g()), esolm(1.0, CLEAN_BIDIRECTIONAL).nelbo(net, b, 2, g())
    assert float(causal.nll_sum) != float(clean_bi.nll_sum)
    same = esolm(0.25, alpha0_eval=1.0).nelbo(net, b, 2, g())
    assert float(same.nll_sum) == float(causal.nll_sum)  # the bound is at alpha0_eval


def test_whole_canvas_calls_put_logits_back_at_their_positions():
    """forward_logits on a canvas (samplers): sorted inside, returned in the canvas's layout."""
    net = PositionTable()
    eso = esolm(0.5)
    z = torch.tensor([[0, MASK, 3, MASK, 5, 6]])
    got = eso.forward_logits(net, z, None, positions=torch.arange(6))
    assert torch.allclose(got, net(z))  # a position-wise network gives its own logits back, position by position
    assert not torch.equal(net.calls[0], torch.arange(6).expand(1, 6))  # it was fed the sorted canvas


def test_config_is_checked_and_built_by_name():
    p = make_process(EsoLMConfig(alpha0=0.25, attention=CLEAN_BIDIRECTIONAL), ModelDescription(vocab_size=V, mask_id=MASK))
    assert isinstance(p, EsoLM) and p.kappa == 0.5 and p.alpha0_eval == 0.25 and p.attention == CLEAN_BIDIRECTIONAL
    for bad, match in [(dict(alpha0=1.5), "alpha0"), (dict(attention="bidirectional"), "causal, clean_bidirectional"),
                       (dict(weight="x"), "elbo, low_var"), (dict(alpha0=0.5, kappa=1.0), "kappa=1"),
                       (dict(alpha0=0.5, kappa=0.0), "kappa=0"), (dict(alpha0_eval=2.0), "alpha0_eval")]:
        with pytest.raises(ValueError, match=match):
            make_process(EsoLMConfig(**bad), ModelDescription(vocab_size=V, mask_id=MASK))


@pytest.mark.parametrize("attention", [CAUSAL, CLEAN_BIDIRECTIONAL])
def test_left_padding_and_a_callers_attention_mask_are_honoured(tiny_network, attention):
    """A left-padded canvas row (key_valid False on the pads, its positions from 0 at its first token) gets the
    logits of the same row unpadded; a caller's attention mask hiding the pads does the same."""
    from dlm.network.base import padding_mask

    net, eso = tiny_network(V), esolm(0.5, attention)
    row = torch.tensor([[0, 3, MASK, 5, MASK, MASK, 7]])
    alone = eso.forward_logits(net, row, None, positions=torch.arange(7))
    padded = torch.cat((torch.tensor([[2, 2, 2]]), row), 1)
    valid = torch.tensor([[False] * 3 + [True] * 7])
    positions = torch.tensor([[0, 0, 0, *range(7)]])
    by_valid = eso.forward_logits(net, padded, None, key_valid=valid, positions=positions)
    by_mask = eso.forward_logits(net, padded, None, attn_mask=padding_mask(valid), positions=positions)
    assert torch.allclose(by_valid[:, 3:], alone, atol=1e-5) and torch.allclose(by_mask[:, 3:], alone, atol=1e-5)
