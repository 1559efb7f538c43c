"""Left padding is never seen, for every registered sampler and every process it serves (float32, one thread): the
README's example (two prompts of different lengths, batched) gives the short prompt's row the same tokens whatever the
pad id, and the tokens of the unpadded single request — every network call goes through `process.forward_logits`
with the canvas's `key_valid` and `positions`, and a row's random draws skip its padding (`rand_rows`).

The models are the golden tests' tiny random networks (tests/golden/cases.py) with a real 300-token tokenizer."""

import pytest
import torch

from dlm.sampler import Canvas
from dlm.sampler.registry import SAMPLERS, make_sampler, sampler_names
from tests.golden import cases as G

PROMPTS = ["And God said", "To be, or not", "And"]  # 11, 12 and 3 tokens with BOS: 11 and 3 share blocks of 8
GEN = 16


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return G.models()


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def options(name: str, model) -> dict:
    """Small, random (temperature > 0) options of a sampler for a 16-token continuation."""
    accepted = SAMPLERS[name].options
    opts = {"steps": 8} if "steps" in accepted else {}
    if "temperature" in accepted:
        opts["temperature"] = 0.8 if name == "llada" else 1.0
    if name == "llada":
        opts["block_length"] = 8
    if name == "blockwise" or model.process.blockwise:
        opts["block_length"] = 8
    return opts


def cases():
    """(sampler name, model name) for every registered sampler and every golden model whose process serves it."""
    models_ = G.models()
    out = []
    for name in sorted(sampler_names(aliases=False)):
        sampler = make_sampler(name, **({"block_length": 8} if name == "blockwise" else {}))
        for m, model in models_.items():
            if model.process.supports(sampler) and not (model.process.blockwise and name not in
                                                        ("ancestral", "ancestral_cache", "first_hitting", "blockwise")):
                out.append((name, m))
    return out


CASES = cases()


@pytest.mark.parametrize("name,model_name", CASES)
def test_left_padding_is_never_seen_whatever_the_pad_id(models, name, model_name):
    """The README's example at the sampler level: the short prompt's row is the same with two pad ids, and equal to
    the unpadded single request."""
    model = models[model_name]
    if model.process.blockwise or name == "blockwise":
        pytest.skip("block by block, generate batches prompts whose padding is whole blocks (the test above)")
    prompts = [[model.tokenizer.bos_token_id] + model.encode(p) for p in PROMPTS[:2]]
    short = min(range(2), key=lambda i: len(prompts[i]))
    assert len(prompts[short]) < len(prompts[1 - short])
    sampler = make_sampler(name, **options(name, model))
    if model.is_autoregressive:
        sampler.suppress_ids = []

    def run(rows, pad_id):
        canvas = Canvas.left_padded(rows, GEN, model.process, pad_id)
        gens = [torch.Generator().manual_seed(11 + i) for i in range(len(rows))]
        return sampler.sample(model.network, model.process, canvas, gens).tokens[:, -GEN:]

    with torch.no_grad():
        a = run(prompts, 5)
        b = run(prompts, 77)
    alone = [torch.Generator().manual_seed(11 + short)]
    canvas = Canvas.left_padded([prompts[short]], GEN, model.process)
    with torch.no_grad():
        single = sampler.sample(model.network, model.process, canvas, alone).tokens[0, -GEN:]
    assert torch.equal(a[short], b[short])
    assert torch.equal(a[short], single)


def test_tokens_computed_counts_the_positions_of_partial_calls(models):
    """nfe_per_row counts calls; tokens_computed the query positions they fed: the whole canvas per call without a
    cache, the prompt then one token per call for the autoregressive sampler, less than the whole canvas with
    Fast-dLLM's dual cache."""
    prompt = "And God said"
    mdlm, ar = models["mdlm"], models["ar"]
    width = 1 + len(mdlm.encode(prompt)) + GEN
    plain = mdlm.generate([prompt], gen_length=GEN, sampler="ancestral", steps=8, precision="32")
    assert int(plain.tokens_computed[0]) == int(plain.nfe_per_row[0]) * width
    left = ar.generate([prompt], gen_length=GEN, precision="32")
    assert int(left.tokens_computed[0]) == (width - GEN) + (GEN - 1)  # the prompt, then one token per call
    kw = dict(gen_length=GEN, sampler="llada", steps=8, block_length=8, precision="32")
    full = mdlm.generate([prompt], cache="none", **kw)
    dual = mdlm.generate([prompt], cache="dual", **kw)
    assert int(full.tokens_computed[0]) == int(full.nfe_per_row[0]) * width
    refreshes = GEN // 8
    assert int(dual.tokens_computed[0]) == refreshes * width + (int(dual.nfe_per_row[0]) - refreshes) * 8
