"""The CPU attention (dlm.network.attention.chunked_attention) against PyTorch's SDPA: outputs and gradients in
float64 for every mask kind and chunking, bf16 within rounding, and the network's logits and KV-cache decoding
whichever implementation runs."""

import pytest
import torch
import torch.nn.functional as F

import dlm.network.attention as attention
from dlm.config import ModelConfig
from dlm.network import KVCache, Transformer


def reference(q, k, v, mask, causal):
    T, S = q.shape[2], k.shape[2]
    if causal:  # query i (of the last T) sees keys 0 .. S - T + i, as with a KV cache
        tri = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        mask = tri if mask is None else mask & tri
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def inputs(B, H, T, S, D, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype).requires_grad_()
    k, v = (torch.randn(B, H, S, D, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    return q, k, v


MASKS = {
    "none": lambda B, T, S: None,
    "key padding": lambda B, T, S: torch.arange(S)[None, None, None, :] >= torch.tensor([0, 3])[:, None, None, None],
    "per row and head": lambda B, T, S: torch.rand(B, 3, T, S, generator=torch.Generator().manual_seed(1)) < 0.7,
    "block": lambda B, T, S: (torch.arange(T)[:, None] // 4 + (S - T) // 4) >= (torch.arange(S)[None, :] // 4),
}


@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T,S,score_bytes", [(16, 16, 1 << 20), (8, 24, 1 << 20), (24, 24, 24 * 24 * 4 * 2),
                                             (24, 24, 24 * 4 * 5)])
def test_equals_sdpa_forward_and_backward(mask_kind, causal, T, S, score_bytes, monkeypatch):
    """Whole heads, groups of 2 heads (score_bytes = 2 heads), and query rows 5 at a time: all agree with SDPA."""
    monkeypatch.setattr(attention, "SCORE_BYTES", score_bytes)
    q, k, v = inputs(2, 3, T, S, 8)
    mask = MASKS[mask_kind](2, T, S)
    ours = attention.chunked_attention(q, k, v, mask, causal)
    ref = reference(q, k, v, mask, causal)
    assert torch.allclose(ours, ref, atol=1e-12)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert torch.allclose(a, b, atol=1e-12)


def test_bf16_within_rounding_of_float64():
    q, k, v = inputs(2, 4, 128, 128, 32)
    ref = reference(q, k, v, None, False)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    qb, kb, vb = (x.detach().bfloat16().requires_grad_() for x in (q, k, v))
    ours = attention.attend(qb, kb, vb)
    assert ours.dtype == torch.bfloat16
    assert (ours.double() - ref).abs().max() < 5e-2
    for a, b in zip(torch.autograd.grad(ours, (qb, kb, vb), grad.bfloat16()), ref_grads):
        assert a.dtype == torch.bfloat16
        assert (a.double() - b).abs().max() < 0.1 * b.abs().max()


def test_fully_masked_rows_give_zeros():
    q, k, v = inputs(1, 1, 4, 4, 8)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2] = False  # query 2 may see nothing
    out = attention.chunked_attention(q, k, v, mask)
    assert torch.equal(out[0, 0, 2], torch.zeros(8, dtype=q.dtype))
    assert torch.allclose(out[0, 0, :2], reference(q, k, v, mask, False)[0, 0, :2])


def test_routing(monkeypatch):
    """bf16 CPU attention without dropout and with boolean (or no) masks is the chunked one, except plain causal
    self-attention over more than 128 tokens; the rest (float32 inputs too) is SDPA."""
    calls = []
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda q, *a, **kw: calls.append(1) or q)
    q = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    attention.attend(q, q, q)
    attention.attend(q, q, q, torch.ones(4, 4, dtype=torch.bool), causal=True)
    assert calls == []
    attention.attend(q, q, q, dropout_p=0.1)
    attention.attend(q, q, q, torch.zeros(4, 4))  # an additive float mask
    assert calls == [1, 1]
    long = torch.randn(1, 1, 200, 8, dtype=torch.bfloat16)
    attention.attend(long, long, long, causal=True)  # plain causal self-attention: the fused kernel skips half
    assert calls == [1, 1, 1]
    attention.attend(long, long, long)
    attention.attend(q, long, long, causal=True)  # causal with a KV-cache prefix
    assert calls == [1, 1, 1]
    attention.attend(q.float(), q.float(), q.float())  # float32: the fused kernel is faster there
    assert calls == [1, 1, 1, 1]


def test_sdpa_path_takes_causal_with_a_mask_or_a_prefix():
    """On the SDPA path (GPUs) causal attention with a KV-cache prefix or an extra mask must match too."""
    q, k, v = inputs(2, 2, 4, 10, 8)
    mask = MASKS["key padding"](2, 4, 10)
    for m in (None, mask):
        got = attention.attend(q, k, v, m, causal=True, dropout_p=1e-12)  # forces SDPA; dropout that small is a no-op
        assert torch.allclose(got, reference(q, k, v, m, True), atol=1e-6)


@torch.no_grad()
def test_an_additive_float_mask_works_with_causal():
    """A float mask (0 / -inf) goes to SDPA; with causal=True the causal rule is added to it, not and-ed."""
    q, k, v = inputs(2, 2, 4, 10, 8)
    keep = MASKS["key padding"](2, 4, 10)
    additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    for T, S in ((4, 10), (10, 10)):
        got = attention.attend(q[:, :, :T], k[:, :, :S], v[:, :, :S], additive[..., :S], causal=True)
        assert torch.allclose(got, reference(q[:, :, :T], k[:, :, :S], v[:, :, :S], keep[..., :S], True), atol=1e-6)


def test_second_derivatives_say_they_are_not_supported():
    q, k, v = (x.double().requires_grad_() for x in inputs(1, 2, 4, 6, 8))
    out = attention.chunked_attention(q, k, v, None, causal=False)
    (grad_q,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|doesn't require grad|does not require grad"):
        grad_q.sum().backward()


def sdpa_everywhere(q, k, v, attn_mask=None, causal=False, dropout_p=0.0):
    return reference(q, k, v, attn_mask, causal)


@pytest.mark.parametrize("n_kv_head", [0, 1], ids=["all-heads", "grouped-kv"])
@pytest.mark.parametrize("causal", [False, True])
def test_network_same_logits_either_implementation(monkeypatch, causal, n_kv_head):
    monkeypatch.setattr(attention, "CHUNKED_DTYPES", (torch.float32,))  # the chunked kernel, in float32 here
    torch.manual_seed(0)
    net = Transformer(ModelConfig(vocab_size=50, n_layer=2, d_model=32, n_head=2, context=64,
                                  n_kv_head=n_kv_head)).eval()
    ids = torch.randint(0, 50, (3, 40))
    ours = net(ids, causal=causal)
    monkeypatch.setattr("dlm.network.transformer.attend", sdpa_everywhere)
    assert torch.allclose(ours, net(ids, causal=causal), atol=1e-5)


@pytest.mark.parametrize("n_kv_head", [0, 1], ids=["all-heads", "grouped-kv"])
@pytest.mark.parametrize("chunked", [False, True])
def test_kv_cache_decoding(monkeypatch, chunked, n_kv_head):
    if chunked:
        monkeypatch.setattr(attention, "CHUNKED_DTYPES", (torch.float32,))
    torch.manual_seed(0)
    net = Transformer(ModelConfig(vocab_size=50, n_layer=2, d_model=32, n_head=2, context=64,
                                  n_kv_head=n_kv_head)).eval()
    ids = torch.randint(0, 50, (2, 20))
    full = net(ids, causal=True)
    cache = KVCache()
    steps = [net(ids[:, :12], causal=True, kv_cache=cache, cache_update=True)]
    for i in range(12, 20):
        steps.append(net(ids[:, i:i + 1], causal=True, kv_cache=cache, cache_update=True))
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_a_per_row_mask_is_not_expanded_to_every_head():
    """The additive bias keeps the mask's own broadcast shape: (B, 1, 1, S) for key padding, not (B * nh, T, S)."""
    keep = MASKS["key padding"](2, 16, 16)
    bias = attention._additive_bias(keep, False, 2, 12, 16, 16, torch.float32, "cpu")
    assert bias.shape == (2, 1, 1, 16)
    assert attention._additive_bias(keep, True, 2, 12, 16, 16, torch.float32, "cpu").shape == (2, 1, 16, 16)
