"""Every registered sampler on every network family, through `dlm.load(folder)` of a tiny checkpoint written in the
family's real layout (tests/network/checkpoints.py), and Fast-dLLM's prefix/dual caches giving the uncached
sampler's tokens where the caches are exact (block-causal attention), shifted predictions (Dream) included."""

import pytest
import torch

import dlm
from dlm.sampler.registry import SAMPLERS, make_sampler, sampler_names
from tests.network.checkpoints import (LLADA_VOCAB, QWEN_VOCAB, gpt2_checkpoint, gpt2_model, llada_checkpoint,
                                       llama_model, qwen_model, qwen_style_checkpoint)
from tests.test_open_models import word_tokenizer

DIFFUSION = ("llada", "dream", "sdar")
CAUSAL = ("llama", "qwen2", "qwen3", "gpt2")


def write_family(folder, family: str):
    """A tiny checkpoint of `family` with a word tokenizer."""
    torch.manual_seed(0)
    if family == "llada":
        llada_checkpoint(folder)
        word_tokenizer(folder, LLADA_VOCAB, 126336, 126081)
        return
    if family == "dream":
        qwen_style_checkpoint(folder, qwen_model(2), "Dream", ["DreamModel"], mask_token_id=151666,
                              pad_token_id=151643, eos_token_id=151643, bos_token_id=151643)
        word_tokenizer(folder, QWEN_VOCAB, 151666, 151643)
        return
    if family == "sdar":
        qwen_style_checkpoint(folder, qwen_model(3), "sdar", ["SDARForCausalLM"], mask_token_id=151669,
                              eos_token_id=151643, pad_token_id=151643)
        word_tokenizer(folder, QWEN_VOCAB, 151669, 151643)
        return
    if family == "gpt2":
        model = gpt2_model()
        gpt2_checkpoint(folder, model)
    else:
        model = llama_model() if family == "llama" else qwen_model(2 if family == "qwen2" else 3, vocab=96)
        qwen_style_checkpoint(folder, model, family, [type(model).__name__])
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else 95
    word_tokenizer(folder, 96, 94, eos)  # the mask token of a causal LM's tokenizer is never used


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    """family -> the DiffusionLM `dlm.load` gives for its folder (each written and loaded once)."""
    models = {}

    def get(family):
        if family not in models:
            folder = tmp_path_factory.mktemp(family)
            write_family(folder, family)
            models[family] = dlm.load(folder)
        return models[family]
    return get


def sampler_options(name: str) -> dict:
    opts = {"steps": 16} if "steps" in SAMPLERS[name].options else {}  # block diffusion splits them by block
    if "block_length" in SAMPLERS[name].options:
        opts["block_length"] = 4
    return opts


@pytest.mark.parametrize("family", DIFFUSION + CAUSAL)
def test_every_supported_sampler_runs_on_every_family(family_model, family):
    model = family_model(family)
    assert model.is_autoregressive == (family in CAUSAL)
    names = [n for n in sorted(sampler_names(aliases=False)) if n != "blockwise"
             and model.process.supports(make_sampler(n, **sampler_options(n)))]
    assert names == ["autoregressive"] if family in CAUSAL else len(names) >= 6, names
    prompts = ["w5 w6 w7", "w9"]  # different lengths: left padding and per-row positions
    for name in names:
        gen = model.generate(prompts, gen_length=8, sampler=name, seed=0, **sampler_options(name))
        assert gen.tokens.shape[0] == 2 and gen.generated_tokens == 16, name
        if not model.is_autoregressive:
            assert not bool((gen.tokens[gen.generated] == model.process.mask_id).any()), name
        again = model.generate(prompts, gen_length=8, sampler=name, seed=0, **sampler_options(name))
        assert torch.equal(gen.tokens, again.tokens), name


def test_dream_layout_folders_sample_with_dreams_sampler_by_default(family_model):
    """A Dream-layout folder's default sampler is `dream` (Dream's own rule, its defaults); LLaDA's stays MDLM's."""
    dream, llada = family_model("dream"), family_model("llada")
    assert dream.process.default_sampler == dream.sampler_name() == "dream"
    assert llada.process.default_sampler == "ancestral_cache"
    kw = dict(gen_length=8, steps=8, seed=0, temperature=0.0)
    default = dream.generate(["w5 w6 w7", "w9"], alg="entropy", **kw)
    named = dream.generate(["w5 w6 w7", "w9"], sampler="dream", alg="entropy", **kw)
    assert torch.equal(default.tokens, named.tokens) and default.nfe == named.nfe


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_fast_dllm_caches_give_the_uncached_tokens(family_model, family, cache, threshold):
    """Exact under block-causal attention (asked for here on LLaDA and Dream), so the cached sampler must reproduce
    the uncached one token for token; Dream's blocks read the prefix's cached final hidden state."""
    model = family_model(family)
    kw = dict(gen_length=12, block_length=4, steps=12, sampler="llada", seed=0, temperature=0.0, block_causal=True)
    if threshold is not None:
        kw["threshold"] = threshold
    prompts = ["w5 w6 w7", "w9", "w11 w12"]
    plain = model.generate(prompts, cache="none", **kw)
    cached = model.generate(prompts, cache=cache, **kw)
    assert torch.equal(cached.tokens, plain.tokens)
    assert cached.nfe == plain.nfe


@pytest.mark.parametrize("inner", ["llada", "ancestral_cache"])
def test_block_causal_sdar_kv_cache_gives_the_uncached_tokens(family_model, inner):
    """SDAR (block-causal, block 4) samples block by block; its KV cache of finished blocks is exact."""
    model = family_model("sdar")
    kw = dict(gen_length=12, steps=12, sampler=inner, seed=0, temperature=0.0)
    cached = model.generate(["w5 w6 w7", "w9"], kv_cache=True, **kw)
    plain = model.generate(["w5 w6 w7", "w9"], kv_cache=False, **kw)
    assert torch.equal(cached.tokens, plain.tokens)


def test_dream_cache_without_the_prefix_hidden_state_is_refused(family_model):
    """The check has teeth: a dual cache that drops the prefix's final hidden states is refused, not silently run
    with position `start` reading its own state."""
    from dlm.network import KVCache

    model = family_model("dream")
    net = model.network
    x = torch.randint(0, 100, (1, 12))
    full = KVCache()
    net(x, kv_cache=full, cache_update=True)
    layers = [(torch.cat((k[:, :, :4], k[:, :, 8:]), 2), torch.cat((v[:, :, :4], v[:, :, 8:]), 2))
              for k, v in full.layers]
    with pytest.raises(ValueError, match="shifted"):
        net(x[:, 4:8], kv_cache=KVCache(layers), positions=torch.arange(4, 8))
    with_hidden = net(x[:, 4:8], kv_cache=KVCache(layers, full.hidden[:, :4]), positions=torch.arange(4, 8))
    uncached = net(x)[:, 4:8]
    assert torch.allclose(with_hidden, uncached, atol=1e-5)  # the refresh's own keys: the same forward


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@torch.no_grad()
def test_an_open_causal_lm_scores_and_decodes_like_transformers(tmp_path, family):
    """A causal LM loaded by dlm (shifted predictions) is an exact autoregressive model: its NLL is transformers'
    next-token NLL, and greedy decoding (with the KV cache and without) picks transformers' greedy tokens."""
    import torch.nn.functional as F

    from dlm.data.batch import make_batch

    torch.manual_seed(0)
    write_family(tmp_path, family)
    lm = dlm.load(tmp_path)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    x = torch.randint(3, 90, (2, 12))
    ref_logits = ref(x).logits  # (B, T, V): position l is about token l + 1
    assert torch.allclose(lm.network.next_token_logits(x), ref_logits, atol=1e-4)
    ref_nll = F.cross_entropy(ref_logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
    out = lm.process.loss(lm.network, make_batch(x))
    assert torch.allclose(out.nll_sum, ref_nll, rtol=1e-4), (float(out.nll_sum), float(ref_nll))
    prompt = "w%d w%d w%d w%d" % tuple(x[0, 1:5].tolist())
    for kv_cache in (True, False):
        gen = lm.generate([prompt], gen_length=6, sampler="autoregressive", temperature=0.0, kv_cache=kv_cache,
                          precision="32")  # as transformers runs it
        given = gen.tokens[:1, :-6]  # the prompt as the canvas holds it (with BOS where the tokenizer has one)
        expected = ref.generate(given, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, given.shape[1]:]
        assert gen.tokens[0, -6:].tolist() == expected.tolist(), kv_cache
