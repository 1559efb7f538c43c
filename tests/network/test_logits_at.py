"""`logits_at` (which positions get logits) and shifted predictions: the same numbers as the full logits indexed,
with and without a KV cache, and a clear refusal of a cache that cannot serve a shifted network."""

import pytest
import torch

from dlm.network import KVCache, Network

V = 23


def ids(seed: int, B: int = 3, T: int = 12) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def choose(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < 0.4


@pytest.mark.parametrize("prediction", ["same_position", "shifted"])
@torch.no_grad()
def test_slice_mask_and_none_index_the_full_logits(tiny_network, prediction):
    net = tiny_network(V, prediction=prediction)
    assert isinstance(net, Network) and net.prediction == prediction
    x = ids(0)
    for causal in (False, True):
        full = net(x, causal=causal)  # (B, T, V)
        assert torch.equal(net(x, causal=causal, logits_at=None), full)
        assert torch.allclose(net(x, causal=causal, logits_at=slice(3, 9)), full[:, 3:9], atol=1e-6)
        assert torch.allclose(net(x, causal=causal, logits_at=slice(-1, None)), full[:, -1:], atol=1e-6)
        sel = choose(3, 12, 1)
        out = net(x, causal=causal, logits_at=sel)
        assert out.shape == (int(sel.sum()), V) and torch.allclose(out, full[sel], atol=1e-6)
        hidden = net(x, causal=causal, return_hidden=True, logits_at=sel)  # what the head reads
        assert torch.allclose(net.head(hidden), full[sel], atol=1e-6)


@torch.no_grad()
def test_the_output_layer_runs_only_on_the_chosen_positions(tiny_network):
    net = tiny_network(V)
    rows = []
    net.head.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape))
    sel = choose(3, 12, 2)
    net(ids(1), logits_at=sel)
    assert rows == [torch.Size([int(sel.sum()), 32])]


@torch.no_grad()
def test_shifted_logits_are_the_same_position_logits_one_step_late(tiny_network):
    same = tiny_network(V, seed=3)
    shifted = tiny_network(V, seed=3, prediction="shifted")
    x = ids(2)
    a, b = same(x, causal=True), shifted(x, causal=True)
    assert torch.equal(b[:, 1:], a[:, :-1]) and torch.equal(b[:, 0], a[:, 0])


@pytest.mark.parametrize("prediction", ["same_position", "shifted"])
@torch.no_grad()
def test_cached_chunks_with_logits_at_equal_the_full_forward(tiny_network, prediction):
    net = tiny_network(V, n_layer=3, prediction=prediction, n_kv_head=1, fused_qkv=False)  # grouped K/V too
    x = ids(4, T=14)
    full = net(x, causal=True)
    cache = KVCache()
    net(x[:, :5], causal=True, kv_cache=cache, cache_update=True)
    assert cache.layers[0][0].shape == (3, 1, 5, 16)  # K/V stored un-expanded: (B, n_kv, T, hd)
    sel = choose(3, 4, 5)
    sel[:, 0] = True  # the chunk's first position reads the last cached hidden state
    assert torch.allclose(net(x[:, 5:9], causal=True, kv_cache=cache, logits_at=sel), full[:, 5:9][sel], atol=1e-5)
    assert torch.allclose(net(x[:, 5:9], causal=True, kv_cache=cache, logits_at=slice(0, 2)), full[:, 5:7], atol=1e-5)
    net(x[:, 5:9], causal=True, kv_cache=cache, cache_update=True)
    assert torch.allclose(net(x[:, 9:], causal=True, kv_cache=cache), full[:, 9:], atol=1e-5)
    rows = torch.tensor([2, 0])
    picked = cache.select(rows)
    assert torch.allclose(net(x[rows, 9:], causal=True, kv_cache=picked), full[rows, 9:], atol=1e-5)
    cache.crop(7)
    assert torch.allclose(net(x[:, 7:], causal=True, kv_cache=cache), full[:, 7:], atol=1e-5)


@torch.no_grad()
def test_a_shifted_network_refuses_a_cache_without_hidden_states(tiny_network):
    net = tiny_network(V, prediction="shifted")
    x = ids(6)
    cache = KVCache()
    net(x[:, :4], causal=True, kv_cache=cache, cache_update=True)
    assembled = KVCache([(k, v) for k, v in cache.layers])  # e.g. a sampler slicing layers by hand
    with pytest.raises(ValueError, match="must hold the final hidden states of the cached positions"):
        net(x[:, 4:], causal=True, kv_cache=assembled)


def test_bad_logits_at_is_named(tiny_network):
    net = tiny_network(V)
    with pytest.raises(ValueError, match=r"bool mask must be \(batch, length\) = \(3, 12\)"):
        net(ids(0), logits_at=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="logits_at must be None, a slice"):
        net(ids(0), logits_at=[1, 2])
