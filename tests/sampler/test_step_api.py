"""The step-level sampler API (`start` / `step` over a `SamplerState`), for every registered sampler that has it:
rows run through `step` while other rows join (`SamplerState.cat`) and leave (`select`) at step boundaries get
exactly the tokens they get alone with `sample` (float32, one thread). Samplers without it are listed, so the gap
is visible rather than silent."""

import pytest
import torch

from dlm.sampler import Canvas
from dlm.sampler.base import Sampler
from dlm.sampler.registry import SAMPLERS, make_sampler, sampler_names
from dlm.sampler.state import SamplerState
from tests.sampler.test_padding import GEN, models, one_thread  # noqa: F401 (fixtures)

PROMPTS = ["And God said", "To be, or not", "And", "The Lord"]


def has_step_api(name: str) -> bool:
    sampler = make_sampler(name, **({"block_length": 8} if name == "blockwise" else {}))
    return type(sampler).step is not Sampler.step


STEPPED = [n for n in sorted(sampler_names(aliases=False)) if has_step_api(n)]
WITHOUT = [n for n in sorted(sampler_names(aliases=False)) if not has_step_api(n)]


def test_which_samplers_have_the_step_api():
    assert "ancestral" in STEPPED and "ancestral_cache" in STEPPED
    assert {"autoregressive", "blockwise", "first_hitting", "llada", "remdm_cap", "remdm_conf", "remdm_loop",
            "remdm_rescale"} <= set(STEPPED)
    assert WITHOUT == [], WITHOUT  # every registered sampler's `sample` is the base loop over start/step


def run_joining_and_leaving(sampler, net, process, canvas, gen, first, joins: dict, width: int) -> dict:
    """Step the requests `first` together through `sampler.step`; request joins[t] joins the running batch before
    its step t (`SamplerState.cat`) and every row leaves when done (`select`). canvas(i) / gen(i): request i's
    canvas and generators. Returns {request: its last `width` tokens}."""
    state = SamplerState.cat([sampler.start(net, process, canvas(i), gen(i)) for i in first])
    ids, got, t = list(first), {}, 0
    while ids:
        if t in joins:
            state = SamplerState.cat([state, sampler.start(net, process, canvas(joins[t]), gen(joins[t]))])
            ids.append(joins[t])
        state, event = sampler.step(state)
        assert event.tokens.shape == state.tokens.shape
        t += 1
        finished = state.done.cpu()
        for row in finished.nonzero().flatten().tolist():
            got[ids[row]] = state.tokens[row, -width:].clone()
        keep = (~finished).nonzero().flatten()
        state, ids = state.select(keep), [ids[r] for r in keep.tolist()]
    return got


def opts(name, model=None):
    accepted = SAMPLERS[name].options
    out = {"steps": 6} if "steps" in accepted else {}
    if "max_denoising_steps" in accepted:  # renoise: 6 steps at most, as the others
        out["max_denoising_steps"] = 6
    if "temperature" in accepted:
        out["temperature"] = 1.0
    if name == "blockwise":  # the model's own block size (every prompt's row keeps its own block grid)
        out["block_length"] = model.process.block_size
    return out


def golden_models(name: str) -> list[str]:
    """The golden models a sampler is stepped on: the plain and the soft-masking MDLM, the AR model, or the
    block-diffusion model (blockwise, with its KV cache)."""
    if name == "blockwise":
        return ["bd3lm"]
    return ["ar"] if getattr(SAMPLERS[name].build, "autoregressive", False) else ["mdlm", "sm"]


@pytest.mark.parametrize("name,model_name", [(n, m) for n in STEPPED for m in golden_models(n)])
def test_rows_joining_and_leaving_get_their_tokens_alone(models, name, model_name):
    model = models[model_name]
    sampler = make_sampler(name, **opts(name, model))
    if model_name == "sm":
        sampler.feedback = model.process.feedback()
    net, process = model.network, model.process
    prompts = [[model.tokenizer.bos_token_id] + model.encode(p) for p in PROMPTS]

    def canvas(i):
        return Canvas.left_padded([prompts[i]], GEN, process)

    def gen(i):
        return [torch.Generator().manual_seed(100 + i)]

    with torch.no_grad():
        alone = [sampler.sample(net, process, canvas(i), gen(i)).tokens[0, -GEN:] for i in range(4)]
        # Rows 0 and 1 start together; row 2 joins after 2 steps, row 3 after 4; every row leaves when done.
        got = run_joining_and_leaving(sampler, net, process, canvas, gen, (0, 1), {2: 2, 4: 3}, GEN)
    for i in range(4):
        assert torch.equal(got[i], alone[i]), (name, model_name, i)


def test_state_select_and_cat_keep_every_per_row_field(models):
    model = models["mdlm"]
    sampler = make_sampler("ancestral", steps=4)
    prompts = [[model.tokenizer.bos_token_id] + model.encode(p) for p in PROMPTS[:2]]
    a = sampler.start(model.network, model.process, Canvas.left_padded(prompts[:1], 4, model.process),
                      [torch.Generator()])
    b = sampler.start(model.network, model.process, Canvas.left_padded(prompts[1:], 4, model.process),
                      [torch.Generator()])
    both = SamplerState.cat([a, b])
    assert both.batch == 2 and both.length == max(a.length, b.length)
    short = 0 if a.length < b.length else 1
    pad = abs(a.length - b.length)
    assert not bool(both.key_valid[short, :pad].any()) and not bool(both.to_generate[short, :pad].any())
    back = both.select(torch.tensor([1 - short]))
    original = (a, b)[1 - short]
    assert torch.equal(back.tokens, original.tokens) and back.generators == original.generators


@pytest.mark.parametrize("kv_cache", [True, False])
def test_autoregressive_rows_joining_with_and_without_a_cache(models, kv_cache):
    """Rows at other positions share each call: with the cache, one token each (a row that just joined holds its
    prefill's logits and feeds a key nobody sees); without, the longest prefix, each row reading its own position."""
    model = models["ar"]
    sampler = make_sampler("autoregressive", temperature=1.0, kv_cache=kv_cache)
    net, process = model.network, model.process
    prompts = [[model.tokenizer.bos_token_id] + model.encode(p) for p in PROMPTS]
    lengths = [GEN, GEN - 5, GEN, GEN - 3]  # rows finish at other steps too

    def canvas(i):
        return Canvas.left_padded([prompts[i]], lengths[i], process)

    def gen(i):
        return [torch.Generator().manual_seed(200 + i)]

    with torch.no_grad():
        alone = {i: sampler.sample(net, process, canvas(i), gen(i)) for i in range(4)}
        got = run_joining_and_leaving(sampler, net, process, canvas, gen, (0, 1), {1: 2, 3: 3}, GEN)
    for i in range(4):
        assert torch.equal(got[i][-lengths[i]:], alone[i].tokens[0, -lengths[i]:]), (kv_cache, i)
        assert int(alone[i].nfe_per_row[0]) == lengths[i]  # the prefill, then one call per token but the first


LLADA = [dict(cache=c, **p) for c in ("none", "prefix", "dual") for p in ({}, {"threshold": 0.3}, {"factor": 1.0})]


@pytest.mark.parametrize("first,joins", [((0, 1), {2: 2, 4: 3}), ((2, 3), {1: 0, 3: 1})],
                         ids=["shorter-join", "longer-join"])
@pytest.mark.parametrize("variant", LLADA + [dict(cfg_scale=1.5), dict(cfg_scale=1.5, cache="dual"),
                                             dict(block_causal=True, cache="prefix")],
                         ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) or "count")
def test_llada_rows_joining_and_leaving_get_their_tokens_alone(models, variant, first, joins):
    """The LLaDA sampler with two blocks, its caches and policies: rows join a running batch in other blocks (each
    block of rows steps on its own), and a longer prompt joining left-pads the running rows' canvases and caches."""
    model = models["mdlm"]
    sampler = make_sampler("llada", steps=8, block_length=8, temperature=0.8, **variant)
    net, process = model.network, model.process
    prompts = [[model.tokenizer.bos_token_id] + model.encode(p) for p in PROMPTS]

    def canvas(i):
        return Canvas.left_padded([prompts[i]], GEN, process)

    def gen(i):
        return [torch.Generator().manual_seed(200 + i)]

    with torch.no_grad():
        alone = {i: sampler.sample(net, process, canvas(i), gen(i)) for i in range(4)}
        got = run_joining_and_leaving(sampler, net, process, canvas, gen, first, joins, GEN)
    for i in range(4):
        assert torch.equal(got[i], alone[i].tokens[0, -GEN:]), (variant, i)


BLOCKWISE = [("bd3lm", dict(inner_sampler="ancestral")), ("bd3lm", dict(inner_sampler="first_hitting")),
             ("bd3lm", dict(kv_cache=False)), ("mdlm", dict(kv_cache=False)),
             ("bd3lm", dict(stop_entropy=2.0, entropy_window=8, fill_id=0))]


@pytest.mark.parametrize("first,joins", [((0, 1), {2: 2, 4: 3}), ((2, 3), {1: 0, 3: 1})],
                         ids=["shorter-join", "longer-join"])
@pytest.mark.parametrize("model_name,variant", BLOCKWISE,
                         ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_blockwise_rows_joining_and_leaving_get_their_tokens_alone(models, model_name, variant, first, joins):
    """The blockwise sampler with its inner samplers, with and without the KV cache, and with a stop rule (rows
    padded with fill_id when they stop): rows joining a running batch keep their own block grid (a longer prompt
    left-pads the others), rows in the same block span share calls, and each gets the tokens and calls it gets
    alone."""
    model = models[model_name]
    sampler = make_sampler("blockwise", steps=6, temperature=1.0, block_length=8, **variant)
    net, process = model.network, model.process
    prompts = [[model.tokenizer.bos_token_id] + model.encode(p) for p in PROMPTS]

    def canvas(i):
        return Canvas.left_padded([prompts[i]], GEN, process)

    def gen(i):
        return [torch.Generator().manual_seed(300 + i)]

    with torch.no_grad():
        alone = {i: sampler.sample(net, process, canvas(i), gen(i)) for i in range(4)}
        got = run_joining_and_leaving(sampler, net, process, canvas, gen, first, joins, GEN)
    for i in range(4):
        assert torch.equal(got[i], alone[i].tokens[0, -GEN:]), (variant, i)
    if "stop_entropy" in variant:
        assert any(r.stop_reasons[0] == "entropy" for r in alone.values())  # the rule did stop some row
