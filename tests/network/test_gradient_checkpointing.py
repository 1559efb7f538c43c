"""trainer.gradient_checkpointing: each block is recomputed in the backward (torch.utils.checkpoint, non-reentrant).

The gradients must be those of the plain network. The recomputation runs the same kernels on the same inputs in the
same process (and restores the random state, so dropout draws the same mask), so the activations it rebuilds are
the ones the plain forward kept, bit for bit; the tolerance below (rtol 1e-6) only allows for a different order in
which autograd sums the contributions to a parameter used in several places (float32 reassociation, ~1e-7)."""

import pytest
import torch

import dlm.network.transformer as transformer
from dlm.config import ModelConfig
from dlm.network import Transformer
from dlm.network.kv_cache import KVCache

FAMILIES = {  # dlm's own block; LLaDA's layout (RMSNorm, SwiGLU, separate q/k/v); adaLN time conditioning
    "dlm": {},
    "llada": {"norm": "rmsnorm", "mlp": "swiglu", "fused_qkv": False, "mlp_hidden": 48},
    "time": {"time_conditioning": True, "cond_dim": 16},
}


def make(family: str, dropout: float = 0.0) -> Transformer:
    torch.manual_seed(0)
    net = Transformer(ModelConfig(vocab_size=37, n_layer=3, n_head=2, d_model=32, context=16, dropout=dropout,
                                  **FAMILIES[family]))
    with torch.no_grad():  # adaLN starts at zero: make the time matter
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return net.train()


def grads(net: Transformer, checkpointing: bool, causal: bool = False) -> tuple[torch.Tensor, dict]:
    net.gradient_checkpointing = checkpointing
    net.zero_grad()
    x = torch.randint(0, 37, (3, 16), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.2, 0.5, 0.9])
    torch.manual_seed(5)  # dropout
    logits = net(x, t=t if net.cfg.time_conditioning else None, causal=causal)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.roll(1, 1).flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradients_equal_the_plain_network(family, dropout):
    net = make(family, dropout)
    loss0, g0 = grads(net, False, causal=family == "dlm")
    loss1, g1 = grads(net, True, causal=family == "dlm")
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name, g in g0.items():
        assert g.abs().sum() > 0, name  # the parameter takes part
        torch.testing.assert_close(g1[name], g, rtol=1e-6, atol=1e-9, msg=name)


def counting(monkeypatch) -> list[int]:
    calls = []
    real = transformer.checkpoint

    def wrapped(fn, *args, **kw):
        calls.append(1)
        return real(fn, *args, **kw)

    monkeypatch.setattr(transformer, "checkpoint", wrapped)
    return calls


def test_each_block_is_checkpointed_in_training(monkeypatch):
    calls = counting(monkeypatch)
    net = make("dlm")
    net.gradient_checkpointing = True
    net(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    assert len(calls) == net.cfg.n_layer


def test_off_at_evaluation_without_gradients_and_with_a_cache(monkeypatch):
    """Sampling and evaluation never recompute: the switch acts only in training mode with gradients on."""
    calls = counting(monkeypatch)
    net = make("dlm")
    net.gradient_checkpointing = True
    x = torch.zeros(1, 8, dtype=torch.long)
    net.eval()(x).sum().backward()  # eval mode: nothing is recomputed
    with torch.no_grad():
        net.train()(x)  # no gradients (validation)
    net(x, kv_cache=KVCache(), cache_update=True)  # a sampler's cached call (it appends to the cache in place)
    assert calls == []


def test_it_saves_the_activations_of_the_blocks():
    """What the forward keeps for the backward, outside the checkpointed blocks: with checkpointing only each block's
    input remains (a few tensors of (B, T, C)); without, every block's intermediate activations."""

    def saved_numel(net) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            net(torch.zeros(2, 16, dtype=torch.long)).sum().backward()
        return sum(sizes)

    net = make("llada")
    plain = saved_numel(net)
    net.gradient_checkpointing = True
    assert saved_numel(net) < plain / 2


def test_not_part_of_the_saved_network():
    """A switch of the training module, not of the weights: a fresh or loaded network has it off."""
    net = Transformer(ModelConfig(vocab_size=11, n_layer=1, d_model=16, n_head=2))
    assert net.gradient_checkpointing is False and net.ce_chunk == 0
    assert "gradient_checkpointing" not in ModelConfig.__dataclass_fields__


def test_with_lora_adapters_and_chunked_ce():
    """LoRA (trainer.lora_rank) injects adapters into the blocks' linear layers and may train the head: both
    switches together give the gradients of the adapters, the embedding and the head of the plain step."""
    pytest.importorskip("peft")
    from dlm.process import MDLMConfig, make_process
    from dlm.train.lora import add_lora

    net = make("llada")
    add_lora(net, 4, 16.0, True)
    with torch.no_grad():  # the B matrices start at zero: make the adapters matter
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    process = make_process(MDLMConfig(), 36)
    x = torch.randint(0, 36, (3, 16), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": x, "loss_mask": torch.ones_like(x, dtype=torch.bool)}
    grads = []
    for checkpointing, chunk in ((False, 0), (True, 5)):
        net.gradient_checkpointing, net.ce_chunk = checkpointing, chunk
        net.zero_grad()
        process.loss(net, batch, torch.Generator().manual_seed(1)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad})
    assert any("lora_" in n for n in grads[0]) and "head.weight" in grads[0]
    for name, g in grads[0].items():  # rtol 1e-5: the chunked head's gradient is summed chunk by chunk
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
