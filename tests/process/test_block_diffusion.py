"""BD3-LM: the one-pass loss against MDLM (B = L) and an autoregressive factorisation (B = 1), the full-range
NELBO under clipping, clipped/resampled noise, the clip search and bad configurations."""

import pytest
import torch
import torch.nn.functional as F

from dlm.config import ConfigError, ModelConfig, build_config
from dlm.network import Transformer
from dlm.process.block_diffusion import BlockDiffusion
from dlm.process.clipped_schedule import clip_grid, search_clip_interval
from dlm.process.mdlm import MaskedDiffusion, subs_logits
from dlm.process.schedules import make_schedule, time_of_mask_rate
from dlm.data.batch import make_batch

V, MASK = 11, 10


def batch_of(rows: int, length: int, seed: int = 0, pad_from: int | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, MASK, (rows, length), generator=g)
    am = None
    if pad_from is not None:  # the last row is padded from `pad_from` on
        am = torch.ones(rows, length, dtype=torch.bool)
        am[-1, pad_from:] = False
    return make_batch(x, am)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("fixed_t", [False, True])
def test_one_block_is_mdlm(tiny_network, fixed_t, padded):
    """B = L: the noisy half attends only within itself, so the loss is MDLM's on the same z and t."""
    net = tiny_network(V)
    L = 16
    batch = batch_of(4, L, pad_from=11 if padded else None)
    sched = make_schedule("loglinear", 1e-3)
    t = torch.tensor([0.2, 0.45, 0.7, 0.95]) if fixed_t else None
    bd = BlockDiffusion(sched, MASK, block_size=L).loss(net, batch, torch.Generator().manual_seed(3), t=t)
    md = MaskedDiffusion(sched, MASK).loss(net, batch, torch.Generator().manual_seed(3), t=t)
    assert bd.num_tokens == md.num_tokens
    torch.testing.assert_close(bd.nll_sum, md.nll_sum, rtol=1e-5, atol=1e-4)


@torch.no_grad()
def causal_mask_readout_nll(net, x: torch.Tensor, full_attention: bool = False) -> torch.Tensor:
    """-log p(x_l | x_<l) (L-1,) for l = 1..L-1, by running the network on [x_0 .. x_{l-1}, MASK] and reading
    position l. With B = 1 the clean half is causal and the [MASK] sees x_<l and itself: a causal pass."""
    out = []
    for l in range(1, x.shape[0]):
        inp = torch.cat((x[:l], torch.tensor([MASK])))[None]
        logits = net(inp, causal=not full_attention)[0, -1]
        out.append(-subs_logits(logits, MASK).log_softmax(-1)[x[l]])
    return torch.stack(out)


@pytest.mark.parametrize("schedule", ["loglinear", "cosine", "linear"])
def test_a_block_at_time_zero_adds_nothing_and_stays_finite(tiny_network, schedule):
    """At t = 0 no token is masked and the NELBO weight is infinite (log-linear) or NaN (cosine): the loss and its
    gradient must stay finite, equal to the loss without that block's (empty) terms."""
    net = tiny_network(V)
    batch = batch_of(2, 16)
    bd = BlockDiffusion(make_schedule(schedule, 1e-3), MASK, block_size=4)
    t = torch.tensor([[0.0, 0.5, 0.7, 0.9], [0.3, 0.0, 0.0, 0.6]])
    out = bd.loss(net, batch, torch.Generator().manual_seed(0), t=t)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_block_size_one_is_an_autoregressive_factorisation(tiny_network):
    """B = 1, alpha_1 = 0 and t = 1 for every block: every scored token is masked with weight 1/t = 1, so the
    NELBO is exactly sum_l -log p(x_l | x_<l), each conditional read from a [MASK] placeholder at l after a causal
    pass over x_<l. (The AR process reads p(x_l | x_<l) from the state of x_{l-1} instead: the same factorisation
    with a different read-out, so on the same weights the two losses are different numbers.)"""
    net = tiny_network(V)
    L = 12
    batch = batch_of(2, L)
    bd = BlockDiffusion(make_schedule("loglinear", 0.0), MASK, block_size=1)
    out = bd.loss(net, batch, torch.Generator().manual_seed(0), t=torch.ones(2, L))
    expected = sum(causal_mask_readout_nll(net, row).sum() for row in batch["input_ids"])
    torch.testing.assert_close(out.nll_sum, expected, rtol=1e-5, atol=1e-4)
    # Sensitivity: letting the clean tokens see each other bidirectionally changes the number.
    wrong = sum(causal_mask_readout_nll(net, row, full_attention=True).sum() for row in batch["input_ids"])
    assert abs(float(wrong - expected.detach())) > 1e-2


def test_block_size_one_terms_do_not_depend_on_other_masks(tiny_network):
    """With B = 1 and any per-block times, each masked token's term is CE_l / t_l with the same causal
    conditional: what other positions are masked never reaches it (the noisy half sees only clean tokens)."""
    net = tiny_network(V)
    L = 12
    batch = batch_of(2, L, seed=5)
    sched = make_schedule("loglinear", 1e-3)
    t = torch.rand(2, L, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.1
    out = BlockDiffusion(sched, MASK, block_size=1).loss(net, batch, torch.Generator().manual_seed(7), t=t)
    u = torch.rand(2, L, generator=torch.Generator().manual_seed(7))  # the same draw add_noise makes
    masked = (u < 1.0 - sched.alpha(t)) & batch["loss_mask"]
    ce = torch.stack([F.pad(causal_mask_readout_nll(net, row), (1, 0)) for row in batch["input_ids"]])  # (2, L)
    torch.testing.assert_close(out.nll_sum, (ce / t)[masked].sum(), rtol=1e-5, atol=1e-4)


def test_nelbo_is_the_full_range_bound_whatever_the_clip(tiny_network):
    net = tiny_network(V)
    batch = batch_of(3, 16)
    sched = make_schedule("loglinear", 1e-3)
    plain = BlockDiffusion(sched, MASK, block_size=4)
    clipped = BlockDiffusion(sched, MASK, block_size=4, clip_low=0.45, clip_high=0.95, resample=True)
    a = plain.nelbo(net, batch, 3, torch.Generator().manual_seed(0))
    b = clipped.nelbo(net, batch, 3, torch.Generator().manual_seed(0))
    assert torch.equal(a.nll_sum, b.nll_sum)
    la = plain.loss(net, batch, torch.Generator().manual_seed(0)).nll_sum
    lb = clipped.loss(net, batch, torch.Generator().manual_seed(0)).nll_sum
    assert not torch.isclose(la, lb)  # training does see the clip


@pytest.mark.parametrize("schedule", ["loglinear", "cosine", "linear"])
def test_clipped_times_give_mask_rates_in_the_interval(schedule):
    sched = make_schedule(schedule, 1e-3)
    rates = torch.tensor([0.0, 0.1, 0.3, 0.45, 0.8, 0.95, 0.99], dtype=torch.float64)
    t = time_of_mask_rate(sched, rates)
    torch.testing.assert_close(1.0 - sched.alpha(t), rates, atol=1e-9, rtol=0)
    bd = BlockDiffusion(sched, MASK, block_size=4, clip_low=0.3, clip_high=0.8)
    times = bd.block_times(64, 8, torch.Generator().manual_seed(0))
    r = 1.0 - sched.alpha(times.double())
    assert r.min() >= 0.3 - 1e-6 and r.max() <= 0.8 + 1e-6
    assert r.max() - r.min() > 0.45  # antithetic strata span the interval


def test_resampling_keeps_block_mask_fractions_in_the_interval():
    sched = make_schedule("loglinear", 1e-3)
    bd = BlockDiffusion(sched, MASK, block_size=4, clip_low=0.45, clip_high=0.95, resample=True)
    batch = batch_of(16, 32)
    g = torch.Generator().manual_seed(0)
    t_tok = bd.block_times(16, 8, g).repeat_interleave(4, dim=1)
    z = bd.add_noise(batch["input_ids"], t_tok, batch["loss_mask"], g)
    masked = ((z == MASK).view(16, 8, 4).sum(-1)).float()
    scored = batch["loss_mask"].view(16, 8, 4).sum(-1).float()
    frac = masked / scored
    assert ((frac >= 0.45) & (frac <= 0.95)).all()


def test_clip_grid_is_the_published_one():
    grid = clip_grid()
    assert (0.45, 0.95) in grid and (0.3, 0.8) in grid and (0.0, 1.0) in grid
    assert len(grid) == 11 + 9 + 7 + 5 + 3 + 1
    assert all(0.0 <= lo < hi <= 1.0 for lo, hi in grid)


def test_clip_search_on_an_uninformed_network_prefers_high_narrow_mask_rates():
    """A freshly initialised network predicts ~uniformly, so each masked token costs ~log V whatever the input.
    The per-block estimate is then ~ log V * (#masked / B) / t with #masked ~ Bin(B, t): its variance
    ~ (1 - t) / (B t) is smallest for the narrowest interval at the highest mask rates, [0.5, 1.0], and every
    interval reaching down to t = 0 (the full range included), where the 1/t weight explodes, is far worse than
    any interval starting at 0.1 or above."""
    torch.manual_seed(0)
    net = Transformer(ModelConfig(n_layer=1, n_head=2, d_model=16, context=16, vocab_size=V)).eval()
    proc = BlockDiffusion(make_schedule("loglinear", 1e-3), MASK, block_size=4)
    batches = [batch_of(8, 16, seed=s) for s in range(3)]
    result = search_clip_interval(proc, net, batches, seed=0)
    assert result["best"] == (0.5, 1.0)
    from_zero = [v for lo, hi, v in result["table"] if lo == 0.0]
    assert max(v for lo, hi, v in result["table"] if lo >= 0.1) < min(from_zero)
    assert search_clip_interval(proc, net, batches, seed=0) == result  # common random numbers: reproducible


def test_soft_inputs_enter_the_noisy_half(tiny_network):
    net = tiny_network(V)
    batch = batch_of(2, 16)
    bd = BlockDiffusion(make_schedule("loglinear", 1e-3), MASK, block_size=4)
    z = batch["input_ids"].clone()
    z[:, 3:9] = MASK
    a = bd.forward_logits(net, z, None, batch)
    b = bd.forward_logits(net, z, None, batch, inputs_embeds=net.embed(z))
    torch.testing.assert_close(a, b)


def test_bad_configurations_raise_clear_errors():
    with pytest.raises(ConfigError, match=r"block_size=5 does not divide model.context=32.*1, 2, 4, 8, 16, 32"):
        build_config(["process=bd3lm", "process.block_size=5", "model.context=32"])
    with pytest.raises(ConfigError, match="time_conditioning=false"):
        build_config(["process=bd3lm", "model.time_conditioning=true"])
    with pytest.raises(ConfigError, match="clip_low"):
        build_config(["process=bd3lm", "process.clip_low=0.9", "process.clip_high=0.5"])
    with pytest.raises(ConfigError, match="process.clip_search is an option of process bd3lm, not of 'mdlm'"):
        build_config(["process=mdlm", "process.clip_search=true"])
    cfg = build_config(["process=bd3lm", "process.block_size=8", "model.context=32"])
    assert (cfg.process.name, cfg.process.block_size) == ("bd3lm", 8)
    sched = make_schedule("loglinear", 1e-3)
    with pytest.raises(ValueError, match="block size 3 does not divide the sequence length 16"):
        BlockDiffusion(sched, MASK, block_size=3).loss(None, batch_of(2, 16))
    with pytest.raises(ValueError, match="one time per block"):
        BlockDiffusion(sched, MASK, block_size=4, time_conditioning=True)
    with pytest.raises(ValueError, match="can never succeed"):
        BlockDiffusion(sched, MASK, block_size=1, clip_low=0.3, clip_high=0.8, resample=True)


def test_per_row_generators_with_resampling_and_without_times(tiny_network):
    """Lists of per-row generators (evaluation) work through every draw of add_noise, resampling included; block
    times cannot be drawn per row, which says so."""
    net = tiny_network(V)
    batch = batch_of(2, 16)
    bd = BlockDiffusion(make_schedule("loglinear", 1e-3), MASK, block_size=4, clip_low=0.3, clip_high=0.5, resample=True)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = bd.loss(net, batch, gens, t=torch.full((2, 4), 0.5))
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="per-row generators need explicit block times"):
        bd.loss(net, batch, gens)
