"""trainer.chunked_ce: the loss's cross-entropy over the vocabulary, computed a chunk of positions at a time.

Against brute force (the (N, V) logits at once): per-position losses and gradients. In float64 the two compute the
same sums in nearly the same order, so they agree to 1e-12; in float32 a matrix product over a subset of rows may
block its sums differently and the head's gradient is summed chunk by chunk, so they agree to float32 rounding
(rtol 1e-5 on values of order 1). And the point of it: the output layer never sees more than `chunk` rows."""

import math

import pytest
import torch
import torch.nn.functional as F

from dlm.config import ConfigError, ModelConfig, build_config
from dlm.network import Transformer
from dlm.network.chunked_ce import chunked_cross_entropy
from dlm.process import MDLMConfig, make_process
from dlm.process.autoregressive import ARConfig

N, C, V, MASK = 37, 16, 50, 7


def brute_force(hidden, head, targets, mask_id):
    logits = head(hidden).float()
    if mask_id is not None:
        logits = logits.clone()
        logits[:, mask_id] = float("-inf")
    return F.cross_entropy(logits, targets, reduction="none")


@pytest.mark.parametrize("mask_id", [None, MASK])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_equals_the_unchunked_cross_entropy(mask_id, dtype, tol, chunk):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(C, V, bias=True).to(dtype)  # a bias too: any output layer
    hidden = torch.randn(N, C, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[targets == MASK] = MASK + 1  # SUBS never scores a [MASK] target
    weights = torch.rand(N, generator=g, dtype=torch.float32)  # per-position weights, as MDLM's w(t)

    results = []
    for fn in (lambda h: brute_force(h, head, targets, mask_id), lambda h: chunked_cross_entropy(h, head, targets, chunk, mask_id)):
        h = hidden.clone().requires_grad_()
        head.zero_grad()
        ce = fn(h)
        (ce * weights).sum().backward()
        results.append((ce.detach(), h.grad, head.weight.grad.clone(), head.bias.grad.clone()))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)
    assert results[0][0].dtype == torch.float32 == results[1][0].dtype


def test_subs_excludes_the_mask_column():
    """Under SUBS the [MASK] logit is -inf: the probability left for the other tokens sums to one."""
    head = torch.nn.Linear(C, V, bias=False)
    hidden = torch.randn(3, C)
    with torch.no_grad():
        head.weight[MASK] = 10 * hidden.mean(0)  # [MASK] would win without SUBS
    every = torch.arange(V).repeat(3, 1)  # each row scored against every token
    ce = chunked_cross_entropy(hidden.repeat_interleave(V, 0), head, every.flatten(), 2, MASK).view(3, V)
    probs = (-ce).exp()
    assert probs[:, MASK].eq(0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(3))


def test_the_head_never_sees_more_than_a_chunk():
    """Forward and backward: the output layer runs on at most `chunk` rows at a time, once per chunk in the forward
    and once more in the backward (the recomputation), and the forward keeps no (rows, V) tensor for the backward."""
    head = torch.nn.Linear(C, V, bias=False)
    rows = []
    head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    hidden = torch.randn(N, C, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        ce = chunked_cross_entropy(hidden, head, torch.randint(0, V, (N,)), 8, MASK)
    assert not any(len(s) == 2 and s[-1] == V for s in saved), saved  # no logits kept (only the chunk's inputs)
    assert rows == [8, 8, 8, 8, 5]
    ce.sum().backward()
    assert max(rows) == 8 and len(rows) == 2 * math.ceil(N / 8)
    assert hidden.grad.abs().sum() > 0 and head.weight.grad.abs().sum() > 0


def test_without_gradients_and_with_nothing_scored():
    head = torch.nn.Linear(C, V)
    hidden, targets = torch.randn(N, C), torch.randint(0, V, (N,))
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(hidden, head, targets, 5), brute_force(hidden, head, targets, None))
    empty = chunked_cross_entropy(torch.randn(0, C, requires_grad=True), head, targets[:0], 5, MASK)
    assert empty.shape == (0,) and empty.requires_grad  # a loss of no scored token still backpropagates (to zero)
    with pytest.raises(ValueError, match="chunk=0 must be a positive"):
        chunked_cross_entropy(hidden, head, targets, 0)


# ------------------------------------------------------------------------------ wired into the processes' losses
def network(prediction="same_position") -> Transformer:
    torch.manual_seed(0)
    net = Transformer(ModelConfig(vocab_size=V, n_layer=2, d_model=32, n_head=2, context=12, prediction=prediction))
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.2)  # far from uniform predictions
    return net.train()


def loss_and_grads(process, net, chunk, batch):
    net.ce_chunk = chunk
    net.zero_grad()
    out = process.loss(net, batch, torch.Generator().manual_seed(3))  # same t and z_t for every chunk size
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("process_cfg", [MDLMConfig(), ARConfig()], ids=["mdlm", "ar"])
@pytest.mark.parametrize("prediction", ["same_position", "shifted"])
def test_process_losses_equal_the_unchunked_ones(process_cfg, prediction):
    net = network(prediction)
    process = make_process(process_cfg, V - 1)
    x = torch.randint(0, V - 1, (4, 12), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.ones_like(x, dtype=torch.bool)
    loss_mask[:, 0] = False  # BOS
    loss_mask[2, 9:] = False  # a padded row
    batch = {"input_ids": x, "loss_mask": loss_mask, "attention_mask": loss_mask | (torch.arange(12) == 0)}
    plain, g0 = loss_and_grads(process, net, 0, batch)
    rows = []
    net.head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    chunked, g1 = loss_and_grads(process, net, 5, batch)
    assert 0 < max(rows) <= 5 < int(plain.num_tokens)  # never the whole (N, V) at once
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.nll_per_row, plain.nll_per_row, rtol=1e-5, atol=1e-5)
    assert torch.equal(chunked.num_tokens, plain.num_tokens)
    for name, g in g0.items():
        torch.testing.assert_close(g1[name], g, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation (nelbo) goes through the same loss
        net.ce_chunk = 5
        a = process.nelbo(net, batch, 1, torch.Generator().manual_seed(4))
        net.ce_chunk = 0
        b = process.nelbo(net, batch, 1, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a.nll_sum, b.nll_sum, rtol=1e-5, atol=1e-5)


def test_config_refuses_a_negative_chunk():
    assert build_config(["trainer.chunked_ce=1024"]).trainer.chunked_ce == 1024
    with pytest.raises(ConfigError, match="trainer.chunked_ce=-1 must be >= 0"):
        build_config(["trainer.chunked_ce=-1"])
