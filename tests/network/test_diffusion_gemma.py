"""DiffusionGemma: a tiny random `DiffusionGemmaForBlockDiffusion` saved by transformers in its real layout loads with
`dlm.load(folder)`, and dlm's network contract gives transformers' own logits: a canvas after an encoded context
(KV cache; a context longer than the sliding window), after two encoded chunks, fed self-conditioning logits, as
input embeddings, left-padded per row. Weights are memory-mapped, the encoder's tied to the decoder's.

Tolerance: the same float32 weights and modules in the same process; dlm passes an explicit boolean mask where
transformers passes none (another SDPA kernel, another summation order), so logits (|x| <= 30, the soft cap) agree to
~1e-5 relative, not bit for bit: TOL = 2e-5 times the largest logit, as for the other families."""

import pytest
import torch

import dlm
from dlm.network import KVCache
from dlm.network.families import CheckpointFormatError, load_pretrained_network
from dlm.network.families.diffusion_gemma import DiffusionGemmaNetwork
from dlm.process.diffusion_gemma import DiffusionGemmaProcess, DiffusionGemmaSelfConditioning
from tests.network.dgemma_checkpoint import CANVAS, VOCAB, WINDOW, dgemma_checkpoint

TOL = 2e-5


def close(a, b) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() < TOL * max(1.0, b.abs().max().item())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return dgemma_checkpoint(tmp_path_factory.mktemp("dgemma"))


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return dlm.load(checkpoint[0])


def hf_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config.get_text_config(decoder=True))


def ids(B, T, seed, low=3):
    return torch.randint(low, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_loads_as_a_diffusion_gemma_model(checkpoint, loaded):
    folder, _ = checkpoint
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    net, process = loaded.network, loaded.process
    assert isinstance(net, DiffusionGemmaNetwork) and isinstance(process, DiffusionGemmaProcess)
    assert (net.vocab_size, net.d_model, net.context, net.prediction, net.canvas_length) == (VOCAB, 32, 256,
                                                                                          "same_position", CANVAS)
    assert net.embed.weight.shape == (VOCAB, 32)
    assert (process.corruption, process.likelihood, process.mask_id) == ("uniform", "estimate", None)
    assert isinstance(loaded.feedback_for(), DiffusionGemmaSelfConditioning)  # generate feeds logits back by default
    _, desc = load_pretrained_network(folder)
    assert (desc.family, desc.process, desc.corruption, desc.pad_id, desc.eos_id, desc.bos_id) == (
        "diffusion_gemma", "diffusion_gemma", "uniform", 0, 1, 2)
    assert (desc.topology, desc.block_size, process.block_size, process.blockwise) == ("block_causal", CANVAS,
                                                                                       CANVAS, True)
    assert loaded.tokenizer.bos_token_id == 2


@torch.no_grad()
def test_canvas_after_a_cached_context_gives_transformers_logits(checkpoint, loaded):
    """The encoder fills the cache causally from a prompt longer than the sliding window; the decoder reads a canvas
    bidirectionally after it, with no self-conditioning signal and then with one."""
    _, model = checkpoint
    net = loaded.network
    P = 2 * WINDOW + 1
    prompt, canvas = ids(2, P, 0), ids(2, CANVAS, 1, low=0)
    where = torch.arange(P, P + CANVAS)[None]
    cache = hf_cache(model)
    ref = model(input_ids=prompt, cache=cache, decoder_input_ids=canvas, decoder_position_ids=where).logits
    kv = KVCache()
    assert net(prompt, kv_cache=kv, cache_update=True, logits_at=slice(0, 0)).shape == (2, 0, VOCAB)
    assert kv.length == P
    ours = net(canvas, kv_cache=kv)
    assert close(ours, ref)
    assert kv.length == P  # the decoder never writes the cache
    assert close(net(inputs_embeds=net.embed_tokens(canvas), kv_cache=kv), ref)  # embeddings = token ids
    # Self-conditioning: the previous step's logits through the network's own block.
    previous = 4 * torch.randn(2, CANVAS, VOCAB, generator=torch.Generator().manual_seed(2))
    ref_sc = model(cache=cache, decoder_input_ids=canvas, self_conditioning_logits=previous,
                   decoder_position_ids=where).logits
    assert (ref_sc - ref).abs().max() > 0.1  # the signal matters
    fed = loaded.process.feedback()(net, canvas, previous, None, None)
    assert close(net(inputs_embeds=fed, kv_cache=kv), ref_sc)
    # logits_at and return_hidden + head, as for every network
    assert close(net(canvas, kv_cache=kv, logits_at=slice(2, 5)), ref[:, 2:5])
    assert close(net.head(net(canvas, kv_cache=kv, return_hidden=True)), ref)


@torch.no_grad()
def test_two_context_chunks_and_the_encoder_logits(checkpoint, loaded):
    """Block by block: a committed canvas is appended to the cache by a second encoder call (window crossing)."""
    _, model = checkpoint
    net = loaded.network
    prompt, first, canvas = ids(1, 5, 3), ids(1, CANVAS, 4), ids(1, CANVAS, 5, low=0)
    cache = hf_cache(model)
    enc = model.model.encoder
    h1 = enc(input_ids=prompt, cache=cache).last_hidden_state
    h2 = enc(input_ids=first, cache=cache, position_ids=torch.arange(5, 5 + CANVAS)[None]).last_hidden_state
    where = torch.arange(5 + CANVAS, 5 + 2 * CANVAS)[None]
    ref = model(cache=cache, decoder_input_ids=canvas, decoder_position_ids=where).logits
    kv = KVCache()
    e1 = net(prompt, kv_cache=kv, cache_update=True)
    e2 = net(first, kv_cache=kv, cache_update=True)
    assert close(net(canvas, kv_cache=kv), ref)
    cap = lambda h: 30 * torch.tanh(model.lm_head(h).float() / 30)  # noqa: E731
    assert close(e1, cap(h1)) and close(e2, cap(h2))  # a cache-writing call is the encoder (causal) pass
    assert close(net.next_token_logits(torch.cat((prompt, first), 1)), torch.cat((cap(h1), cap(h2)), 1))


@torch.no_grad()
def test_a_left_padded_row_gets_its_own_logits(loaded):
    """Per-row key validity and positions: a short prompt padded on the left of a batch reads what it reads alone."""
    net = loaded.network
    long, short, canvas = ids(1, 11, 6), ids(1, 7, 7), ids(2, CANVAS, 8, low=0)
    prompts = torch.cat((long, torch.cat((torch.zeros(1, 4, dtype=torch.long), short), 1)))
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, :4] = False
    positions = torch.stack((torch.arange(11), torch.cat((torch.zeros(4, dtype=torch.long), torch.arange(7)))))
    from dlm.network.base import padding_mask

    kv = KVCache()
    net(prompts, kv_cache=kv, cache_update=valid, positions=positions, attn_mask=padding_mask(valid), logits_at=slice(0, 0))
    batch = net(canvas, kv_cache=kv, positions=torch.stack((torch.arange(11, 19), torch.arange(7, 15))))
    alone = KVCache()
    net(short, kv_cache=alone, cache_update=True)
    assert close(batch[1:], net(canvas[1:], kv_cache=alone))
    first = KVCache()
    net(long, kv_cache=first, cache_update=True)
    assert close(batch[:1], net(canvas[:1], kv_cache=first))


def test_weights_are_memory_mapped_and_tied(checkpoint, loaded):
    folder, _ = checkpoint
    model = loaded.network.model
    path = str((folder / "model.safetensors").resolve())
    spans = [tuple(int(a, 16) for a in line.split()[0].split("-")) for line in open("/proc/self/maps")
             if line.rstrip().endswith(path)]
    tensors = [*model.parameters(), *(b for n, b in model.named_buffers() if "layer_scalar" in n)]
    assert spans and all(any(a <= p.data_ptr() < b for a, b in spans) for p in tensors)
    enc, dec = model.model.encoder.language_model, model.model.decoder
    assert enc.layers[1].self_attn.q_proj.weight is dec.layers[1].self_attn.q_proj.weight
    assert enc.embed_tokens.weight is dec.embed_tokens.weight is model.lm_head.weight
    assert not hasattr(model.model.encoder, "vision_tower")  # text only


@torch.no_grad()
def test_sharded_folder_and_errors(tmp_path, checkpoint, loaded):
    _, model = checkpoint
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    net, _ = load_pretrained_network(tmp_path / "sharded")
    kv, ref_kv = KVCache(), KVCache()
    prompt, canvas = ids(1, 4, 9), ids(1, CANVAS, 10, low=0)
    net(prompt, kv_cache=kv, cache_update=True)
    loaded.network(prompt, kv_cache=ref_kv, cache_update=True)
    assert close(net(canvas, kv_cache=kv), loaded.network(canvas, kv_cache=ref_kv))  # (other alignment: not bitwise)
    with pytest.raises(ValueError, match="encodes its context .* from token ids"):
        net(inputs_embeds=net.embed_tokens(prompt), kv_cache=KVCache(), cache_update=True)
    # A tensor of the wrong shape is named before anything is assigned.
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    model.save_pretrained(str(bad))
    state = load_file(str(bad / "model.safetensors"))
    state["model.decoder.norm.weight"] = torch.ones(5)
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match=r"model.decoder.norm.weight has shape \(5,\), expected \(32,\)"):
        load_pretrained_network(bad)
    import json

    config = json.loads((bad / "config.json").read_text())
    config["text_config"]["use_bidirectional_attention"] = "all"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match="use_bidirectional_attention='all'"):
        load_pretrained_network(bad)


def test_the_feedback_refuses_a_network_without_the_block(tiny_network):
    net = tiny_network(VOCAB)
    with pytest.raises(ValueError, match="needs a network with its self-conditioning block"):
        DiffusionGemmaSelfConditioning()(net, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, net.vocab_size),
                                         None, None)
