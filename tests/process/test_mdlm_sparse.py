"""MaskedDiffusion.loss scores only masked positions (output layer on N rows): it must equal the dense NELBO
formula `nelbo_terms` on the full (B, L, V) logits, with padding, for every schedule and with time conditioning."""

import pytest
import torch

from dlm.config import ModelConfig
from dlm.process import MDLMConfig
from dlm.network import Transformer
from dlm.process import make_process, nelbo_terms
from dlm.process.mdlm import key_padding_mask, antithetic_times


@pytest.mark.parametrize("schedule", ["loglinear", "cosine", "linear"])
@pytest.mark.parametrize("time_conditioning", [False, True])
def test_sparse_loss_equals_dense_formula(schedule, time_conditioning):
    torch.manual_seed(0)
    V, mask_id = 40, 39
    net = Transformer(ModelConfig(vocab_size=V, n_layer=2, d_model=32, n_head=2, context=12,
                                  time_conditioning=time_conditioning, cond_dim=16))
    if time_conditioning:  # adaLN starts at zero; make t matter
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.data.normal_(0, 0.05)
    process = make_process(MDLMConfig(schedule=schedule), mask_id, time_conditioning)
    x = torch.randint(0, mask_id, (5, 12))
    attention = torch.ones_like(x, dtype=torch.bool)
    attention[3, 8:] = False  # a padded row
    loss_mask = attention.clone()
    loss_mask[:, 0] = False
    batch = {"input_ids": x, "loss_mask": loss_mask, "attention_mask": attention}

    out = process.loss(net, batch, torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)  # replay the same draws: t, then z_t
    t = antithetic_times(5, process.sampling_eps, g, "cpu")
    z = process.add_noise(x, t, loss_mask, g)
    logits = net(z, t=t if time_conditioning else None, attn_mask=key_padding_mask(batch))
    dense = nelbo_terms(logits, x, z, t, process.schedule, mask_id, loss_mask)
    assert torch.allclose(out.nll_sum, dense.sum(), rtol=1e-5, atol=1e-5)
    assert out.num_tokens == loss_mask.sum()
    assert (z[~loss_mask] == x[~loss_mask]).all()  # BOS and padding are never noised


def test_gradients_flow_through_sparse_loss():
    net = Transformer(ModelConfig(vocab_size=30, n_layer=1, d_model=16, n_head=2, context=8))
    process = make_process(MDLMConfig(), 29)
    x = torch.randint(0, 29, (4, 8))
    lm = torch.ones_like(x, dtype=torch.bool)
    lm[:, 0] = False
    process.loss(net, {"input_ids": x, "loss_mask": lm}, torch.Generator().manual_seed(0)).loss.backward()
    assert net.head.weight.grad.abs().sum() > 0 and net.embed.weight.grad.abs().sum() > 0
