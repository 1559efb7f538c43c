"""Blockwise generation: the cached pass equals the training attention, cached == uncached tokens, inner samplers,
stopping rules, sliding window, MDLM without a cache, bad input, and the `dlm train` / `dlm sample` recipe."""

import math
from types import SimpleNamespace

import pytest
import torch

from dlm.network import KVCache
from dlm.process.block_diffusion import BlockDiffusion
from dlm.process.block_mask import prefix_mask
from dlm.process.mdlm import MaskedDiffusion
from dlm.process.schedules import make_schedule
from dlm.sampler.ancestral import AncestralSampler
from dlm.sampler.blockwise import BlockContext, BlockwiseSampler
from dlm.sampler.first_hitting import FirstHittingSampler
from dlm.process import Autoregressive
from tests.toy_canvas import sample

V, MASK, BOS, EOS, PAD = 11, 10, 0, 1, 2
SCHED = make_schedule("loglinear", 1e-3)


def canvas_of(rows: int, length: int, prompt: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.full((rows, length), MASK)
    c[:, 0] = BOS
    c[:, 1:1 + len(prompt)] = torch.tensor(prompt, dtype=torch.long) if prompt else c[:, 1:1]
    return c, c != MASK


def test_cached_block_logits_equal_the_training_layout(tiny_network):
    """Denoising block b from the KV cache sees exactly what the noisy half sees in one-pass training on [z ; x]."""
    net = tiny_network(V)
    B, L, b = 4, 32, 3
    bd = BlockDiffusion(SCHED, MASK, block_size=B)
    x = torch.randint(3, MASK, (2, L), generator=torch.Generator().manual_seed(0))
    z = x.clone()
    z[:, b * B:(b + 1) * B] = torch.tensor([MASK, 5, MASK, MASK])  # block b half-noised
    z[:, (b + 1) * B:] = MASK  # later blocks: whatever they hold is invisible to block b
    train_logits = bd.forward_logits(net, z, None, {"input_ids": x})[:, b * B:(b + 1) * B]
    cache = KVCache()
    net(x[:, :b * B], attn_mask=prefix_mask(0, b * B, B), kv_cache=cache, cache_update=True)
    ctx = BlockContext(bd, B, b * B, cache, None)
    cached_logits = ctx.forward_logits(net, z[:, b * B:(b + 1) * B], None, {})
    torch.testing.assert_close(cached_logits, train_logits, rtol=1e-4, atol=1e-4)
    uncached = BlockContext(bd, B, b * B, None, x[:, :b * B]).forward_logits(net, z[:, b * B:(b + 1) * B], None, {})
    torch.testing.assert_close(uncached, train_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("inner", ["ancestral", "ancestral_cache", "first_hitting"])
def test_cached_and_uncached_generation_give_identical_tokens(tiny_network, inner):
    """Same seed, same tokens — with a prompt that ends inside a block and a length past the context (32), so the
    sliding window is exercised too."""
    net = tiny_network(V)
    bd = BlockDiffusion(SCHED, MASK, block_size=4)
    make = {"ancestral": lambda: AncestralSampler(6), "ancestral_cache": lambda: AncestralSampler(6, cache=True),
            "first_hitting": lambda: FirstHittingSampler()}[inner]
    canvas, fixed = canvas_of(3, 70, prompt=[4, 5, 6, 7, 8, 9])
    outs = [sample(BlockwiseSampler(make(), 4, kv_cache=kv, steps=6 * 17), net, bd, canvas, fixed,
                   torch.Generator().manual_seed(1)) for kv in (True, False)]  # 6 steps in each of 17 blocks
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert outs[0].tokens.shape == (3, 70) and not (outs[0].tokens == MASK).any()
    assert torch.equal(outs[0].tokens[:, :7], canvas[:, :7])  # the prompt is kept
    assert outs[0].tokens.unique().numel() > 3  # real sampling, not a constant


def test_first_hitting_spends_one_call_per_token(tiny_network):
    net = tiny_network(V)
    bd = BlockDiffusion(SCHED, MASK, block_size=4)
    canvas, fixed = canvas_of(1, 24, prompt=[4, 5])  # 21 tokens to generate in 6 blocks
    uncached = sample(BlockwiseSampler(FirstHittingSampler(), 4, kv_cache=False), net, bd, canvas, fixed)
    cached = sample(BlockwiseSampler(FirstHittingSampler(), 4, kv_cache=True), net, bd, canvas, fixed)
    assert uncached.nfe == 21
    assert cached.nfe == 21 + 5  # + one cache-filling pass before each block after the first


def test_mdlm_blockwise_without_cache_and_cache_refused(tiny_network):
    net = tiny_network(V)
    md = MaskedDiffusion(SCHED, MASK)
    canvas, fixed = canvas_of(2, 40, prompt=[4])
    out = sample(BlockwiseSampler(AncestralSampler(4 * 5, cache=True), 8, kv_cache=False), net, md, canvas, fixed)
    assert out.tokens.shape == (2, 40) and not (out.tokens == MASK).any()
    with pytest.raises(ValueError, match="needs a block-diffusion \\(bd3lm\\) model.*kv_cache=False"):
        sample(BlockwiseSampler(AncestralSampler(4 * 5), 8, kv_cache=True), net, md, canvas, fixed)
    with pytest.raises(ValueError, match="autoregressive"):
        sample(BlockwiseSampler(AncestralSampler(4 * 5), 8, kv_cache=False), net, Autoregressive(), canvas, fixed)
    with pytest.raises(ValueError, match="needs the clean sequence"):  # a plain sampler cannot drive bd3lm
        sample(AncestralSampler(4), net, BlockDiffusion(SCHED, MASK, 4), canvas[:, :8], fixed[:, :8])


class Favouring(torch.nn.Module):
    """A stand-in network: logits that strongly favour one token per row (or are random), for stopping rules."""

    def __init__(self, favoured: list[int | None], context: int = 64):
        super().__init__()
        self.favoured, self.cfg = favoured, SimpleNamespace(context=context)

    def forward(self, input_ids=None, inputs_embeds=None, kv_cache=None, cache_update=False, **kw):
        B, T = input_ids.shape
        logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(T))
        for row, tok in enumerate(self.favoured):
            if tok is not None:
                logits[row, :, tok] += 30.0
        return logits


def test_stop_at_eos_per_row():
    bd = BlockDiffusion(SCHED, MASK, block_size=4)
    canvas, fixed = canvas_of(2, 24)
    out = sample(BlockwiseSampler(FirstHittingSampler(), 4, kv_cache=True, stop_at_eos=True, eos_id=EOS, fill_id=PAD),
                 Favouring([EOS, 5]), bd, canvas, fixed, torch.Generator().manual_seed(0))
    assert out.stop_reasons == ["eos", "length"] and out.lengths == [2, 24]
    assert out.tokens.shape == (2, 24)
    assert out.tokens[0, :2].tolist() == [BOS, EOS] and (out.tokens[0, 2:] == PAD).all()
    assert (out.tokens[1, 1:] == 5).all()


def test_stop_when_entropy_collapses_and_not_otherwise():
    bd = BlockDiffusion(SCHED, MASK, block_size=4)
    canvas, fixed = canvas_of(1, 40)
    repeat = BlockwiseSampler(FirstHittingSampler(), 4, stop_entropy=0.5, entropy_window=8, fill_id=PAD)
    out = sample(repeat, Favouring([5]), bd, canvas, fixed)
    # The first window of 8 tokens is BOS + 7 x "5": entropy H(1/8, 7/8) = 0.38 nats < 0.5 -> stop there.
    assert out.stop_reasons == ["entropy"] and out.lengths == [8]
    assert out.tokens.shape == (1, 40) and (out.tokens[0, 8:] == PAD).all()
    assert out.nfe == 7 + 1  # 7 tokens in 2 blocks, one cache-filling pass; the other 8 blocks never ran
    diverse = sample(repeat, Favouring([None]), bd, canvas, fixed, torch.Generator().manual_seed(0))
    assert diverse.stop_reasons == ["length"] and diverse.tokens.shape == (1, 40)


def test_bad_stopping_arguments():
    inner = FirstHittingSampler()
    for bad in (0.0, -1.0, math.log(256) + 0.01, 7.0):
        with pytest.raises(ValueError, match="out of range"):
            BlockwiseSampler(inner, 4, stop_entropy=bad, fill_id=PAD)
    with pytest.raises(ValueError, match="needs eos_id"):
        BlockwiseSampler(inner, 4, stop_at_eos=True)
    with pytest.raises(ValueError, match="two blocks"):
        sample(BlockwiseSampler(inner, 4, window=6), Favouring([5]), BlockDiffusion(SCHED, MASK, 4), *canvas_of(1, 12))
    with pytest.raises(ValueError, match="shorter than one block"):
        sample(BlockwiseSampler(inner, 4, window=3), Favouring([5]), BlockDiffusion(SCHED, MASK, 4), *canvas_of(1, 3))


@pytest.fixture(scope="module")
def bd3_run(tmp_path_factory, micro_run, micro_args):
    """The recipe: `dlm train process=bd3lm process.block_size=4 init_from=<MDLM run>` with the clip search."""
    from dlm.cli import main

    out = tmp_path_factory.mktemp("runs") / "bd3"
    assert main(["train", *micro_args(out, "process=bd3lm", "process.block_size=4", f"init_from={micro_run}",
                                      "process.clip_search=true", "trainer.max_steps=3")]) == 0
    return out


def test_recipe_trains_searches_the_clip_and_samples(bd3_run, capsys):
    import json

    import yaml

    from dlm.cli import main
    from dlm.process.clipped_schedule import clip_grid

    cfg = yaml.safe_load((bd3_run / "config.yaml").read_text())
    assert cfg["process"]["name"] == "bd3lm" and cfg["process"]["block_size"] == 4
    chosen = (cfg["process"]["clip_low"], cfg["process"]["clip_high"])
    assert chosen in clip_grid() and tuple(json.loads((bd3_run / "clip_search.json").read_text())["best"]) == chosen
    import dlm

    model = dlm.load(bd3_run)
    assert (model.process.name, model.process.clip_low, model.process.clip_high) == ("bd3lm", *chosen)
    assert main(["sample", str(bd3_run), "--num-samples", "2", "--length", "48", "--inner-sampler", "first_hitting",
                 "--stop-at-eos", "--seed", "3"]) == 0
    assert "blockwise (first_hitting" in capsys.readouterr().out


def test_pipeline_generates_bd3_blockwise_with_and_without_cache(bd3_run, micro_run):
    import dlm

    model = dlm.load(bd3_run)
    # 45 > context 32: sliding window. fp32: under bf16 autocast the two paths round differently (different matmul
    # shapes), so a token drawn near a probability boundary can differ.
    kw = dict(num_samples=2, length=45, prompt="And the", steps=4 * 12, seed=1, precision="32")  # ~4 per block
    cached = model.generate(**kw)
    uncached = model.generate(**kw, sampler_options={"kv_cache": False})
    assert torch.equal(cached.tokens, uncached.tokens) and cached.tokens.shape == (2, 45)
    assert cached.nfe > uncached.nfe  # the cache-filling passes
    mdlm = dlm.load(micro_run)
    semi_ar = mdlm.generate(**kw, sampler="blockwise", block_length=4)
    assert semi_ar.tokens.shape == (2, 45) and not (semi_ar.tokens == mdlm.tokenizer.mask_token_id).any()
    with pytest.raises(ValueError, match="needs a block-diffusion"):
        mdlm.generate(**kw, sampler="blockwise", block_length=4, sampler_options={"kv_cache": True})


@pytest.mark.parametrize("inner", ["ancestral_cache", "first_hitting"])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_the_stepped_loop_equals_the_whole_block_loop(tiny_network, inner, kv_cache):
    """`sample` (the base loop over start/step) and `_sample_by_blocks` (the loop kept for inner samplers without the
    step API, which runs the inner `sample` on each whole block) give the same tokens, calls, stops and events — a
    prompt ending inside a block, the sliding window past the context (32), an entropy stop in one row and a
    callback stopping another row mid-way."""
    net = tiny_network(V)
    bd = BlockDiffusion(SCHED, MASK, block_size=4)
    make = {"ancestral_cache": lambda: AncestralSampler(3, cache=True), "first_hitting": FirstHittingSampler}[inner]
    sampler = BlockwiseSampler(make(), 4, kv_cache=kv_cache, steps=3 * 12, stop_entropy=0.75, entropy_window=8,
                               fill_id=PAD)
    canvas, fixed = canvas_of(3, 50, prompt=[4, 5, 4, 5, 4, 5])
    canvas[0, 1:7] = 4  # row 0 repeats itself: its first 8 tokens have entropy <= 0.74 nats, it stops there
    from dlm.sampler.base import Canvas

    runs = []
    for run in (sampler.sample, sampler._sample_by_blocks):
        events = []

        def callback(event):
            confidence = None if event.confidence is None else event.confidence.clone()  # None: a cache fill
            events.append((event.step, event.tokens.clone(), event.committed.clone(), confidence, event.nfe,
                           event.nfe_per_row.clone()))
            return torch.tensor([False, False, event.step == 9])  # row 2 stops at the 10th event

        out = run(net, bd, Canvas.from_fixed(canvas, fixed), torch.Generator().manual_seed(3), callback)
        runs.append((out, events))
    (a, ea), (b, eb) = runs
    assert torch.equal(a.tokens, b.tokens) and a.nfe == b.nfe and torch.equal(a.nfe_per_row, b.nfe_per_row)
    assert torch.equal(a.tokens_computed, b.tokens_computed) and torch.equal(a.stopped, b.stopped)
    assert a.lengths == b.lengths and a.stop_reasons == b.stop_reasons
    assert a.stop_reasons[0] == "entropy" and a.stop_reasons[2] == "callback" and len(ea) == len(eb) > 10
    for x, y in zip(ea, eb):
        assert x[0] == y[0] and x[4] == y[4] and (x[3] is None) == (y[3] is None)
        for k, p, q in zip("tcpn", x[1:4] + x[5:], y[1:4] + y[5:]):
            assert p is None or torch.equal(p, q), (x[0], k, p, q)
