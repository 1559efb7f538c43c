"""The KV cache's per-row key validity, partial appends and row selection / stacking: a cached forward equals the
uncached one on the rows and positions it stands for (float32, same process, so compared to 1e-5)."""

import pytest
import torch

from dlm.network import KVCache
from dlm.network.base import padding_mask

V = 13


@pytest.fixture
def net(tiny_network):
    return tiny_network(V, seed=1)


def test_per_row_key_validity_hides_left_padding_in_later_calls(net):
    """A sequence with 3 pads on the left, prefilled with cache_update=key_valid (B, T): its later chunk's logits
    equal the unpadded sequence's (causal attention in both)."""
    torch.manual_seed(0)
    seq = torch.randint(0, V, (1, 9))
    padded = torch.cat((torch.full((1, 3), 4), seq), 1)  # (1, 12)
    valid = torch.arange(12)[None] >= 3
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = net(seq, causal=True)[:, 5:]  # (1, 4, V): the uncached, unpadded forward (left to right)
        cache = KVCache()
        net(padded[:, :8], attn_mask=padding_mask(valid[:, :8]), causal=True, positions=positions[:, :8],
            kv_cache=cache, cache_update=valid[:, :8])
        assert cache.length == 8 and torch.equal(cache.key_valid, valid[:, :8])
        got = net(padded[:, 8:], causal=True, positions=positions[:, 8:], kv_cache=cache)  # valid cached keys only
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_appending_only_some_positions(net):
    """cache_update as a (T,) mask keeps only those positions' keys: here the odd ones of a chunk, which then give
    exactly the keys an uncached call over those positions alone (at their own positions) attends to."""
    torch.manual_seed(1)
    x = torch.randint(0, V, (2, 6))
    keep = torch.tensor([False, True, False, True, False, True])
    with torch.no_grad():
        cache = KVCache()
        net(x, kv_cache=cache, cache_update=keep, attn_mask=keep[None, None, None, :] | torch.eye(6, dtype=torch.bool))
        assert cache.length == 3 and cache.key_valid is None
        q = torch.randint(0, V, (2, 2))
        got = net(q, positions=torch.arange(6, 8), kv_cache=cache)
        # Uncached: the kept tokens attend only to each other; the queries to them and to each other.
        full = torch.cat((x, q), 1)
        kept = torch.cat((keep, torch.zeros(2, dtype=torch.bool)))
        query = torch.arange(8) >= 6
        mask = kept[None, :] | (query[:, None] & query[None, :]) | torch.eye(8, dtype=torch.bool)
        want = net(full, attn_mask=mask)[:, 6:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cat_and_select_of_rows(net):
    """Caches of two requests of different lengths, stacked (the shorter left-padded with invalid keys), give each
    row the logits of its own cache; `select` picks rows back out."""
    torch.manual_seed(2)
    a, b = torch.randint(0, V, (1, 7)), torch.randint(0, V, (2, 4))
    with torch.no_grad():
        ca, cb = KVCache(), KVCache()
        net(a, kv_cache=ca, cache_update=True)
        net(b, kv_cache=cb, cache_update=True)
        both = KVCache.cat([ca, cb])
        assert both.length == 7 and both.key_valid.tolist() == [[True] * 7] + [[False] * 3 + [True] * 4] * 2
        q = torch.randint(0, V, (3, 2))
        positions = torch.tensor([[7, 8], [4, 5], [4, 5]])
        got = net(q, positions=positions, kv_cache=both)
        want_a = net(q[:1], positions=torch.arange(7, 9), kv_cache=ca)
        want_b = net(q[1:], positions=torch.arange(4, 6), kv_cache=cb)
        torch.testing.assert_close(got, torch.cat((want_a, want_b)), rtol=1e-5, atol=1e-5)
        picked = both.select(torch.tensor([2]))
        torch.testing.assert_close(net(q[2:], positions=positions[2:], kv_cache=picked), want_b[1:], rtol=1e-5,
                                   atol=1e-5)


def test_a_bad_cache_update_mask_is_refused(net):
    with pytest.raises(ValueError, match="cache_update as a mask"):
        net(torch.zeros(1, 4, dtype=torch.long), kv_cache=KVCache(), cache_update=torch.ones(5, dtype=torch.bool))


def test_cat_keeps_a_shifted_networks_hidden_states(tiny_network):
    """A shifted network's first new position reads the hidden state of the last cached one: caches of different
    lengths, stacked, keep `hidden` left-padded like the keys, so each row's next-token logits are its own cache's."""
    net = tiny_network(V, seed=4, prediction="shifted")
    torch.manual_seed(3)
    a, b = torch.randint(0, V, (1, 6)), torch.randint(0, V, (1, 3))
    with torch.no_grad():
        ca, cb = KVCache(), KVCache()
        net.next_token_logits(a, kv_cache=ca, cache_update=True)
        net.next_token_logits(b, kv_cache=cb, cache_update=True)
        both = KVCache.cat([ca, cb])
        assert both.hidden is not None and both.hidden.shape[:2] == (2, 6)
        q = torch.randint(0, V, (2, 1))
        got = net.next_token_logits(q, positions=torch.tensor([[6], [3]]), kv_cache=both, cache_update=True)
        want_a = net.next_token_logits(q[:1], kv_cache=ca, cache_update=True)
        want_b = net.next_token_logits(q[1:], kv_cache=cb, cache_update=True)
        torch.testing.assert_close(got, torch.cat((want_a, want_b)), rtol=1e-5, atol=1e-5)


def test_a_cache_with_capacity_appends_in_place_and_gives_the_same_logits(net):
    """capacity > 0: decoding one token at a time writes into reserved storage (its layers are views of it, no new
    tensor per step once reserved; grown to twice its need when full), and every step's logits equal those of a cache that
    concatenates; `crop` keeps the storage and the next append overwrites the cropped keys; `select` / `cat` give
    plain tensors again, which the next append copies into new storage."""
    torch.manual_seed(3)
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        plain, reserved = KVCache(), KVCache(capacity=4)
        for i in range(12):
            want = net(x[:, i:i + 1], causal=True, kv_cache=plain, cache_update=True)
            got = net(x[:, i:i + 1], causal=True, kv_cache=reserved, cache_update=True)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        storage = reserved.storage[0][0]
        assert reserved.length == 12 and storage.shape[2] == 22  # 4, then twice what it must hold: 10, 22
        assert reserved.layers[0][0].data_ptr() == storage.data_ptr()
        for a, b in zip(reserved.layers, plain.layers):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        # crop, then append other tokens: the same as a concatenating cache treated alike
        plain.crop(9)
        reserved.crop(9)
        y = torch.randint(0, V, (2, 2))
        want = net(y, causal=True, kv_cache=plain, cache_update=True)
        got = net(y, causal=True, kv_cache=reserved, cache_update=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert reserved.length == 11 and reserved.storage[0][0].data_ptr() == storage.data_ptr()
        one = reserved.select(torch.tensor([1]))
        assert one.capacity == 4 and not one.storage
        want = net(y[1:, :1], causal=True, kv_cache=plain.select(torch.tensor([1])), cache_update=True)
        got = net(y[1:, :1], causal=True, kv_cache=one, cache_update=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert one.length == 12 and one.storage[0][0].shape[2] == 24
        assert KVCache.cat([one, reserved]).capacity == 4


def test_a_read_only_call_on_a_cache_with_capacity_leaves_it_as_it_was(net):
    """A call that attends to the cache without extending it (a block's inner steps) writes its keys as scratch past
    the cached part: same logits as a concatenating cache, same length, and the next append overwrites them."""
    torch.manual_seed(4)
    x, q, r = torch.randint(0, V, (2, 6)), torch.randint(0, V, (2, 3)), torch.randint(0, V, (2, 2))
    with torch.no_grad():
        plain, reserved = KVCache(), KVCache(capacity=16)
        for cache in (plain, reserved):
            net(x, causal=True, kv_cache=cache, cache_update=True)
        storage = reserved.storage[0][0]
        for _ in range(2):  # twice: the scratch of the first call does not leak into the second
            want = net(q, positions=torch.arange(6, 9), kv_cache=plain)
            got = net(q, positions=torch.arange(6, 9), kv_cache=reserved)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert reserved.length == 6 and reserved.storage[0][0].data_ptr() == storage.data_ptr()
        want = net(r, causal=True, kv_cache=plain, cache_update=True)
        got = net(r, causal=True, kv_cache=reserved, cache_update=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(reserved.layers, plain.layers):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
