"""The backbone: attention direction, ids vs embeddings, KV cache, adaLN time conditioning, rotary, weight tying."""

import pytest
import torch

from dlm.network import KVCache

V = 17


def ids(seed: int, B: int = 2, T: int = 12) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_bidirectional_output_depends_on_later_tokens_causal_does_not(tiny_network):
    net = tiny_network(V)
    x = ids(0)
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % V  # change only the tokens after position 7
    bi_x, bi_y = net(x), net(y)
    ca_x, ca_y = net(x, causal=True), net(y, causal=True)
    assert (bi_x[:, :8] - bi_y[:, :8]).abs().amax(-1).min() > 1e-3  # every earlier position sees the change
    assert torch.equal(ca_x[:, :8], ca_y[:, :8])  # causal: bit-identical before the change
    assert (ca_x[:, 8:] - ca_y[:, 8:]).abs().max() > 1e-3


@torch.no_grad()
def test_ids_and_their_embeddings_give_identical_logits(tiny_network):
    net = tiny_network(V)
    x = ids(1)
    assert torch.equal(net(x), net(inputs_embeds=net.embed(x)))
    assert torch.equal(net(x, causal=True), net(inputs_embeds=net.embed(x), causal=True))


@pytest.mark.parametrize("prefix", [1, 5])
@torch.no_grad()
def test_kv_cache_incremental_decoding_equals_full_causal_forward(tiny_network, prefix):
    net = tiny_network(V, n_layer=3)
    x = ids(2, B=3, T=14)
    full = net(x, causal=True)  # (B, T, V)
    cache = KVCache()
    pieces = [net(x[:, :prefix], causal=True, kv_cache=cache, cache_update=True)]
    assert cache.length == prefix and len(cache.layers) == 3
    for i in range(prefix, x.shape[1]):
        pieces.append(net(x[:, i:i + 1], causal=True, kv_cache=cache, cache_update=True))
    assert cache.length == x.shape[1]
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-5
    # Reading the cache without updating it leaves it as it was.
    net(x[:, :2], causal=True, kv_cache=cache, cache_update=False)
    assert cache.length == x.shape[1]


@torch.no_grad()
def test_time_conditioning_starts_as_a_no_op_then_depends_on_t(tiny_network):
    net = tiny_network(V, time_conditioning=True)
    x = ids(3)
    t0, t1 = torch.full((2,), 0.05), torch.full((2,), 0.9)
    assert torch.equal(net(x, t=t0), net(x, t=t1))  # adaLN is zero-initialised
    assert torch.equal(net(x, t=t0), net(x))  # t=None means t=0
    g = torch.Generator().manual_seed(0)
    for block in net.blocks:
        block.adaln.weight.copy_(torch.randn(block.adaln.weight.shape, generator=g) * 0.1)
    assert (net(x, t=t0) - net(x, t=t1)).abs().max() > 1e-3


@torch.no_grad()
def test_rotary_scores_depend_only_on_relative_positions(tiny_network):
    net = tiny_network(V)
    x = ids(4)
    T = x.shape[1]
    base = net(x, positions=torch.arange(T))
    for shift in (1, 7, 100):
        shifted = net(x, positions=torch.arange(T) + shift)
        assert (shifted - base).abs().max() < 1e-4
    # Positions do matter: a permutation of the positions changes the output.
    perm = net(x, positions=torch.arange(T).flip(0))
    assert (perm - base).abs().max() > 1e-2


def test_tie_weights_shares_the_tensor(tiny_network):
    net = tiny_network(V, tie_weights=True, std=0)
    assert net.head.weight is net.embed.weight
    with torch.no_grad():
        net.embed.weight[3].fill_(0.5)
    assert bool((net.head.weight[3] == 0.5).all())
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in tiny_network(V, std=0).parameters()) - V * 32


def test_time_conditioning_in_the_network_dtype(tiny_network):
    """The time features are computed in float32 and handed to the MLP in the network's own dtype."""
    net = tiny_network(V, time_conditioning=True).double()
    x, t = ids(0), torch.tensor([0.3, 0.8], dtype=torch.float64)
    assert net(x, t=t).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda e: net(inputs_embeds=e, t=t), (net.embed(x).detach().requires_grad_(),),
                                    eps=1e-6, atol=1e-5, nondet_tol=1e-12)


def test_bad_inputs_are_named(tiny_network):
    net = tiny_network(V, time_conditioning=True)
    x = ids(0)
    with pytest.raises(ValueError, match="either input_ids .* or inputs_embeds"):
        net(x, inputs_embeds=net.embed(x))
    with pytest.raises(ValueError, match="either input_ids"):
        net(None)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, length\).*input_ids\[None\]"):
        net(x[0])
    with pytest.raises(ValueError, match="positions must be"):
        net(x, positions=torch.arange(3))
    with pytest.raises(ValueError, match=r"t must be one diffusion time per row, shape \(2,\)"):
        net(x, t=torch.zeros(2, 1))
    assert torch.equal(net(x, t=torch.tensor(0.4)), net(x, t=torch.tensor([0.4, 0.4])))  # a 0-d t: every row


def test_default_network_keeps_its_parameter_names_and_shapes(tiny_network):
    """Existing checkpoints load: the open-checkpoint options leave the default network's state dict unchanged."""
    state = tiny_network(V, std=0).state_dict()
    block = {"ln1.weight": (32,), "ln1.bias": (32,), "ln2.weight": (32,), "ln2.bias": (32,),
             "attn.qkv.weight": (96, 32), "attn.proj.weight": (32, 32), "mlp.fc.weight": (128, 32),
             "mlp.proj.weight": (32, 128)}
    expected = {"embed.weight": (V, 32), **{f"blocks.{i}.{k}": s for i in range(2) for k, s in block.items()},
                "ln_f.weight": (32,), "ln_f.bias": (32,), "head.weight": (V, 32)}
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
