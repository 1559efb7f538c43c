"""Every family's tiny checkpoint, written in its real layout, loads into dlm's Transformer and gives the logits of
an independent implementation (transformers' Llama / Qwen2 / Qwen3 / GPT-2 holding the same weights)."""

import pytest
import torch

from dlm.network import KVCache
from dlm.network.families import ModelDescriptor, load_pretrained_network
from tests.network.checkpoints import (LLADA_VOCAB, QWEN_VOCAB, all_visible, gpt2_checkpoint, gpt2_model,
                                       llada_checkpoint, llama_model, qwen_model, qwen_style_checkpoint)

TOL = 2e-5


def ids(vocab: int, B: int = 2, T: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, min(vocab, 5000), (B, T), generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() < TOL * max(1.0, b.abs().max().item())


@torch.no_grad()
def test_transformers_reference_really_runs_bidirectionally():
    """The reference for the bidirectional families: a 4-D all-visible mask makes position 0 see later tokens."""
    model = llama_model()
    x = ids(96)
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 96
    bi = lambda z: model(z, attention_mask=all_visible(*z.shape)).logits  # noqa: E731
    assert (bi(x)[:, 0] - bi(y)[:, 0]).abs().max() > 1e-3
    assert torch.equal(model(x).logits[:, 0], model(y).logits[:, 0])  # without it: causal


@pytest.mark.parametrize("kv,tied", [(4, False), (2, True)], ids=["llada", "illada-like-gqa-tied"])
@torch.no_grad()
def test_llada_sharded_equals_llama_bidirectional(tmp_path, kv, tied):
    model = llada_checkpoint(tmp_path, kv=kv, tied=tied, shards=2)
    net, desc = load_pretrained_network(tmp_path)
    assert (desc.family, desc.mask_id, desc.eos_id, desc.eot_id) == ("llada", 126336, 126081, 126348)
    assert (desc.prediction, desc.topology, desc.corruption) == ("same_position", "bidirectional", "absorbing")
    assert net.vocab_size == LLADA_VOCAB and net.prediction == "same_position"
    assert (net.head.weight is net.embed.weight) == tied
    x = ids(LLADA_VOCAB)
    assert close(net(x), model(x, attention_mask=all_visible(*x.shape)).logits)


@torch.no_grad()
def test_llada_bf16_weights_stay_bf16_and_are_not_copied(tmp_path):
    llada_checkpoint(tmp_path, shards=1, dtype=torch.bfloat16)
    net, _ = load_pretrained_network(tmp_path)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    x = ids(LLADA_VOCAB)
    assert net(x).dtype == torch.bfloat16
    net32, _ = load_pretrained_network(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in net32.parameters()} == {torch.float32}
    # Memory-mapped, not read into fresh allocations: every parameter lies inside a mapping of the file.
    path = str((tmp_path / "model.safetensors").resolve())
    spans = [tuple(int(a, 16) for a in line.split()[0].split("-")) for line in open("/proc/self/maps")
             if line.rstrip().endswith(path)]
    assert spans and all(any(a <= p.data_ptr() < b for a, b in spans) for p in net.parameters())
    assert not any(any(a <= p.data_ptr() < b for a, b in spans) for p in net32.parameters())  # converted: copies


@torch.no_grad()
def test_dream_equals_qwen2_shifted_position_by_position(tmp_path):
    model = qwen_model(2)
    qwen_style_checkpoint(tmp_path, model, "Dream", ["DreamModel"], shards=3, mask_token_id=151666,
                          pad_token_id=151643, eos_token_id=151643, bos_token_id=151643)
    net, desc = load_pretrained_network(tmp_path)
    assert (desc.family, desc.mask_id, desc.pad_id, desc.eot_id) == ("dream", 151666, 151643, 151645)
    assert (desc.prediction, desc.padding_side, net.prediction) == ("shifted", "left", "shifted")
    x = ids(QWEN_VOCAB)
    ref = model(x, attention_mask=all_visible(*x.shape)).logits  # (B, T, V) at the position that computed them
    ours = net(x)
    assert close(ours[:, 1:], ref[:, :-1])  # the logits for token i come from position i - 1
    assert close(ours[:, 0], ref[:, 0])  # position 0 keeps its own, as Dream's generation code does
    # Left padding: per-row positions from the attention mask, as Dream computes them.
    positions = torch.tensor([[0, 0, 0, *range(7)], list(range(10))])
    ref = model(x, attention_mask=all_visible(*x.shape), position_ids=positions).logits
    assert close(net(x, positions=positions)[:, 1:], ref[:, :-1])


@torch.no_grad()
def test_sdar_equals_qwen3_and_records_block_causal(tmp_path):
    model = qwen_model(3)
    qwen_style_checkpoint(tmp_path, model, "sdar", ["SDARForCausalLM"], mask_token_id=151669, eos_token_id=151643,
                          pad_token_id=151643)
    net, desc = load_pretrained_network(tmp_path)
    assert (desc.family, desc.mask_id, desc.topology, desc.block_size) == ("sdar", 151669, "block_causal", 4)
    assert desc.prediction == net.prediction == "same_position"
    assert net.blocks[0].attn.q_norm is not None
    x = ids(QWEN_VOCAB)
    assert close(net(x, causal=True), model(x).logits)
    block = torch.arange(10) // 4
    mask = block[:, None] >= block[None, :]  # block-causal(4), given to both
    ref = model(x, attention_mask=torch.zeros(10, 10).masked_fill(~mask, float("-inf"))[None, None].expand(2, 1, 10, 10))
    assert close(net(x, attn_mask=mask), ref.logits)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@torch.no_grad()
def test_causal_lms_equal_transformers_causal(tmp_path, family):
    if family == "llama":  # grouped K/V and Llama 3.1's rope scaling, with positions past the original context
        model = llama_model(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
                                             "rope_theta": 500000.0}, tie_word_embeddings=True)
    elif family == "qwen2":
        model = qwen_model(2, vocab=96, rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 1e4})
    else:
        model = qwen_model(3, vocab=96, head_dim=16)  # Qwen3's explicit head width (4 x 16 != 32)
    qwen_style_checkpoint(tmp_path, model, family, [type(model).__name__])
    net, desc = load_pretrained_network(tmp_path)
    assert (desc.family, desc.prediction, desc.topology, desc.mask_id, desc.corruption) == (
        family, "shifted", "causal", None, "none")
    x = ids(96, T=20)
    ref = model(x).logits
    ours = net(x, causal=True)
    assert close(ours[:, 1:], ref[:, :-1]) and close(ours[:, 0], ref[:, 0])


@pytest.mark.parametrize("prefix", [True, False], ids=["transformers-names", "original-names"])
@torch.no_grad()
def test_gpt2_equals_transformers(tmp_path, prefix):
    model = gpt2_model()
    gpt2_checkpoint(tmp_path, model, prefix=prefix)
    net, desc = load_pretrained_network(tmp_path)
    assert desc.family == "gpt2" and net.pos_embed is not None and net.head.weight is net.embed.weight
    x = ids(96, T=16)
    ref = model(x).logits
    ours = net(x, causal=True)
    assert close(ours[:, 1:], ref[:, :-1])


@torch.no_grad()
def test_shifted_network_decodes_with_a_kv_cache(tmp_path):
    """A Dream-like network: chunk by chunk through a cache gives the full causal forward's logits, also with
    logits_at; the first position of each chunk reads the cached last hidden state."""
    model = qwen_model(2)
    qwen_style_checkpoint(tmp_path, model, "Dream", ["DreamModel"])
    net, _ = load_pretrained_network(tmp_path)
    x = ids(QWEN_VOCAB, T=12)
    full = net(x, causal=True)
    cache, pieces = KVCache(), []
    for a, b in ((0, 5), (5, 6), (6, 12)):
        pieces.append(net(x[:, a:b], causal=True, kv_cache=cache, cache_update=True))
    assert close(torch.cat(pieces, 1), full)
    cache.crop(6)
    sel = torch.zeros(2, 6, dtype=torch.bool)
    sel[0, 0], sel[1, 4] = True, True
    out = net(x[:, 6:], causal=True, kv_cache=cache, logits_at=sel)  # (2, V)
    assert close(out, full[:, 6:][sel])


def test_descriptor_round_trip_and_validation(tmp_path):
    llada_checkpoint(tmp_path, shards=1)
    _, desc = load_pretrained_network(tmp_path)
    assert ModelDescriptor.from_dict(desc.to_dict()) == desc
    desc.validate({"mask_token_id": 126336})
    with pytest.raises(ValueError, match="config.json says mask_token_id=5 but the descriptor has mask_id=126336"):
        desc.validate({"mask_token_id": 5})
    with pytest.raises(ValueError, match="unknown model descriptor fields"):
        ModelDescriptor.from_dict({**desc.to_dict(), "colour": "red"})
