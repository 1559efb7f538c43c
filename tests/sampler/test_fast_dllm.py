"""Fast-dLLM caches: exact where the method is exact (block-causal attention), equal at the refresh and
bounded after it for a bidirectional model; soft-masking feedback composes with every cache mode."""

import pytest
import torch

from dlm.network import KVCache
from dlm.process import MaskedDiffusion, make_schedule
from dlm.sampler import InputFeedback
from dlm.sampler import fast_dllm
from dlm.sampler.llada import generate_llada
from tests.toy_canvas import llada_with_trajectory
from dlm.sampler.policies import ConfidenceThreshold, CountSchedule

V = 24
MASK = V - 1
PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 3, 4, 5, 6, 7, 8]]
P = max(len(p) for p in PROMPTS)


@pytest.fixture
def net(tiny_network):
    return tiny_network(V, seed=1, std=0.5)


@pytest.fixture
def process():
    return MaskedDiffusion(make_schedule("loglinear", 1e-3), mask_id=MASK)


class Recorder(torch.nn.Module):
    """The network, keeping the logits (B, T_q, V) of every call's queries."""

    def __init__(self, net):
        super().__init__()
        self.net, self.embed, self.head, self.calls = net, net.embed, net.head, []

    def forward(self, *args, **kw):
        out = self.net(*args, **kw)
        self.calls.append(self.net.head(out) if kw.get("return_hidden") else out)
        return out


def block_logits(calls, T, gen_start, block_length, steps_per_block):
    """The current block's logits (B, block_length, V) of each call, whatever span the call computed."""
    out = []
    for i, logits in enumerate(calls):
        start = gen_start + (i // steps_per_block) * block_length
        offset = start if logits.shape[1] == T else 0  # cached steps' queries start at the block
        out.append(logits[:, offset:offset + block_length])
    return out


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_exact_with_block_causal_attention(net, process, cache, cfg_scale):
    """Blocks that cannot see later blocks: every step's logits and every token agree with no cache."""
    gen, block, steps = 16, 4, 16
    kw = dict(gen_length=gen, block_length=block, steps=steps, cfg_scale=cfg_scale, block_causal=True,
              temperature=0.8)
    runs = {}
    for mode in ["none", cache]:
        rec = Recorder(net)
        out = generate_llada(rec, process, PROMPTS, cache=mode, generator=torch.Generator().manual_seed(0), **kw)
        runs[mode] = out, block_logits([c.chunk(2)[0] if cfg_scale else c for c in rec.calls], P + gen, P, block,
                                       steps // (gen // block))
    (plain, plain_logits), (cached, cached_logits) = runs["none"], runs[cache]
    assert torch.equal(plain.tokens, cached.tokens) and plain.nfe == cached.nfe == steps
    for a, b in zip(plain_logits, cached_logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_exact_threshold_decoding_with_block_causal_attention(net, process, cache):
    kw = dict(gen_length=16, block_length=8, steps=16, policy=ConfidenceThreshold(0.4), block_causal=True)
    plain = generate_llada(net, process, PROMPTS, cache="none", **kw)
    cached = generate_llada(net, process, PROMPTS, cache=cache, **kw)
    assert torch.equal(plain.tokens, cached.tokens) and plain.nfe == cached.nfe < 16


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_approximate_cache_equal_at_refresh_and_bounded_after(tiny_network, process, cache, seed):
    """Bidirectional model: the refresh step is the uncached forward itself; at the next step the cache is
    stale (the cached keys were computed before the first commits), yet it tracks the commits: its logits are
    closer to the fresh ones than the refresh's logits are."""
    net = tiny_network(V, seed=seed, std=0.3)
    gen, block = 16, 8
    kw = dict(gen_length=gen, block_length=block, steps=8)  # 4 steps per block, 2 tokens per step
    recs = {}
    for mode in ["none", cache]:
        recs[mode] = Recorder(net)
        generate_llada(recs[mode], process, PROMPTS, cache=mode, **kw)
    plain = block_logits(recs["none"].calls, P + gen, P, block, 4)
    cached = block_logits(recs[cache].calls, P + gen, P, block, 4)
    assert torch.equal(plain[0], cached[0])  # refresh: the same forward
    error = (cached[1] - plain[1]).abs().max()
    change = (plain[1] - plain[0]).abs().max()
    assert 0 < error < change


def test_dual_cache_holds_prefix_then_suffix():
    k = torch.arange(10.0).view(1, 1, 10, 1).expand(2, 3, 10, 4)
    full = KVCache([(k, -k)])
    dual = fast_dllm.keep_cached("dual", full, 3, 6)
    assert dual.layers[0][0][0, 0, :, 0].tolist() == [0, 1, 2, 6, 7, 8, 9]
    assert torch.equal(dual.layers[0][1], -dual.layers[0][0])
    assert fast_dllm.keep_cached("prefix", full, 3, 6).length == 3
    mask = torch.rand(2, 1, 10, 10) < 0.5
    step = fast_dllm.step_attention_mask(mask, "dual", 3, 6)  # (B, 1, 3 queries, 7 cached + 3 queries)
    assert torch.equal(step, mask[:, :, 3:6][..., [0, 1, 2, 6, 7, 8, 9, 3, 4, 5]])
    assert torch.equal(fast_dllm.step_attention_mask(mask, "prefix", 3, 6), mask[:, :, 3:])


class TokenEmbeddings(InputFeedback):
    """Feeds the plain embeddings of the canvas: must reproduce sampling without feedback exactly."""

    def __init__(self):
        self.shapes = []

    def __call__(self, network, z, logits, fixed, masks_left):
        self.shapes.append((tuple(z.shape), tuple(logits.shape), masks_left.tolist()))
        return network.embed(z)


class HalfMix(InputFeedback):
    """Still-masked positions get 0.5 E[mask] + 0.5 E[argmax of this step]; others keep E[z]."""

    def __call__(self, network, z, logits, fixed, masks_left):
        e = network.embed(z)
        guess = network.embed(logits.argmax(-1))
        return torch.where((z == MASK)[..., None], 0.5 * e + 0.5 * guess, e)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_token_embedding_feedback_reproduces_plain_sampling(net, process, cache):
    kw = dict(gen_length=16, block_length=8, steps=8, cache=cache)
    fb = TokenEmbeddings()
    plain = generate_llada(net, process, PROMPTS, **kw)
    fed = generate_llada(net, process, PROMPTS, feedback=fb, **kw)
    assert torch.equal(plain.tokens, fed.tokens) and plain.nfe == fed.nfe
    assert fb.shapes[0][:2] == ((3, 8), (3, 8, V))  # the feedback sees the current block only
    left = torch.tensor([s[2] for s in fb.shapes])  # (steps, B): each row's fraction of masks left
    assert (left.diff(dim=0) <= 0).all() and (left[-1] == 0).all() and (left[0] == 14 / 16).all()


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_soft_masking_keeps_caches_exact(net, process, cache):
    """Mixed embeddings change the samples, and with block-causal attention the caches still agree exactly."""
    kw = dict(gen_length=16, block_length=8, steps=16, block_causal=True)
    plain = llada_with_trajectory(net, process, PROMPTS, cache="none", **kw)
    mixed = llada_with_trajectory(net, process, PROMPTS, cache="none", feedback=HalfMix(), **kw)
    cached = llada_with_trajectory(net, process, PROMPTS, cache=cache, feedback=HalfMix(), **kw)
    assert not torch.equal(plain.tokens, mixed.tokens)
    assert torch.equal(mixed.tokens, cached.tokens)
    prev = mixed.trajectory[0]
    for canvas in mixed.trajectory[1:]:  # committed tokens never change under feedback either
        assert torch.equal(canvas[prev != MASK], prev[prev != MASK])
        prev = canvas


def test_library_soft_masking_with_caches(net, process):
    """dlm.softmask's feedback (training-free w_s) through every cache: exact under block-causal attention."""
    from dlm.softmask import build_feedback

    feedback = build_feedback(None, MASK, omega_s=0.9, omega_b=-3.0)
    kw = dict(gen_length=16, block_length=8, steps=16, block_causal=True, feedback=feedback)
    runs = [generate_llada(net, process, PROMPTS, cache=c, **kw).tokens for c in ["none", "prefix", "dual"]]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    plain = generate_llada(net, process, PROMPTS, gen_length=16, block_length=8, steps=16, block_causal=True).tokens
    assert not torch.equal(plain, runs[0])


def test_soft_masking_with_bidirectional_caches_runs(net, process):
    for cache in ["prefix", "dual"]:
        out = generate_llada(net, process, PROMPTS, 16, 8, 16, policy=CountSchedule(), cache=cache,
                             feedback=HalfMix(), cfg_scale=1.0)
        assert (out.tokens != MASK).all()
