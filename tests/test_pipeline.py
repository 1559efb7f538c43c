"""`DiffusionLM`: canvases (prompt, template), generation of any length, the NELBO and perplexity API."""

import copy
import math

import pytest
import torch

import dlm
import dlm.pipeline

LONG_TEXT = "And the king said unto the people, behold the land which the Lord hath given. " * 4


@pytest.fixture(scope="module")
def model(micro_run):
    return dlm.load(micro_run)


def test_template_fills_exactly_the_mask_spans(model):
    template = "The king [MASK*5] the land, and [MASK] said [MASK*3]"
    canvas, fixed = model.build_canvas(0, template=template)
    assert int((~fixed).sum()) == 5 + 1 + 3
    assert bool((canvas[~fixed] == model.tokenizer.mask_token_id).all())
    assert canvas[0] == model.tokenizer.bos_token_id and bool(fixed[0])
    gen = model.generate(num_samples=4, template=template, steps=6, seed=3)
    assert gen.tokens.shape == (4, canvas.numel())
    for row in gen.tokens:
        assert torch.equal(row[fixed], canvas[fixed])  # the text around the spans is kept, token for token
        assert not bool((row == model.tokenizer.mask_token_id).any())
    assert all(text.startswith("The king") for text in gen.texts)
    # The filled spans sit where the template put them: decoding the fixed pieces alone gives the template's text.
    pieces = [p for p in template.replace("[MASK*5]", "|").replace("[MASK*3]", "|").replace("[MASK]", "|").split("|")]
    assert model.tokenizer.decode(canvas[fixed][1:].tolist()) == "".join(pieces)


def test_prompt_is_kept_as_a_prefix(model):
    prompt = "And the king said"
    ids = model.encode(prompt)
    gen = model.generate(num_samples=3, length=20, prompt=prompt, steps=5, seed=0)
    assert gen.tokens.shape == (3, 20)
    assert bool((gen.tokens[:, 1:1 + len(ids)] == torch.tensor(ids)).all())
    assert all(t.startswith(prompt) for t in gen.texts)


def test_prompt_longer_than_the_context_names_the_lengths(model):
    n = len(model.encode(LONG_TEXT))
    assert n > model.context
    for length in (None, 20, 3 * model.context):
        with pytest.raises(ValueError, match=rf"prompt is {n} tokens long.*context is {model.context}"):
            model.generate(prompt=LONG_TEXT, length=length, steps=2)
    with pytest.raises(ValueError, match=rf"needs \d+ tokens but the model's context is {model.context}"):
        model.generate(template=LONG_TEXT + " [MASK*4]", steps=2)


def test_generate_argument_errors(model):
    with pytest.raises(ValueError, match="not both"):
        model.generate(prompt="a", template="b [MASK]")
    with pytest.raises(ValueError, match="no \\[MASK\\]"):
        model.generate(template="nothing to fill")
    with pytest.raises(ValueError, match="steps=0"):
        model.generate(steps=0)
    with pytest.raises(ValueError, match="num_samples=0"):
        model.generate(num_samples=0)
    for top_p in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="top_p"):
            model.generate(steps=2, top_p=top_p)


def test_longer_than_the_context_is_semi_autoregressive(model):
    gen = model.generate(num_samples=2, length=2 * model.context + 5, steps=4, seed=0, stride=10, prompt="The")
    assert gen.tokens.shape == (2, 2 * model.context + 5)
    assert not bool((gen.tokens == model.tokenizer.mask_token_id).any())
    assert all(t.startswith("The") for t in gen.texts)


def test_generation_is_reproducible_and_batching_does_not_change_it(model):
    a = model.generate(num_samples=4, length=16, steps=6, seed=5, batch_size=4)
    b = model.generate(num_samples=4, length=16, steps=6, seed=5, batch_size=4)
    c = model.generate(num_samples=4, length=16, steps=6, seed=6, batch_size=4)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_nelbo_and_perplexity(model, text_folder):
    ids = torch.tensor([[model.tokenizer.bos_token_id] + model.encode(LONG_TEXT)[: model.context - 1]])
    from dlm.data.batch import make_batch

    batch = make_batch(ids, None)
    s1, n1 = model.nelbo(batch, num_t_samples=4, seed=0)
    s2, _ = model.nelbo(batch, num_t_samples=4, seed=0)
    assert s1 == s2 and n1 == model.context - 1 and s1 > 0  # deterministic per seed
    ppl = model.perplexity(source=str(text_folder), split="val", num_t_samples=2, max_rows=8)
    assert ppl["num_rows"] == 8 and ppl["num_tokens"] == 8 * (model.context - 1) and ppl["bound"]
    assert math.isclose(ppl["ppl"], math.exp(ppl["nll_per_token"]))
    # A 12-step model is still close to uniform over its 300 tokens; the bound cannot be far below that.
    assert 30 < ppl["ppl"] < 3000


def test_tokens_per_second_counts_only_generated_tokens(model):
    canvas, fixed = model.build_canvas(24, prompt="And the king said")
    gen = model.generate(num_samples=3, length=24, prompt="And the king said", steps=4)
    given = int(fixed.sum())  # BOS and the prompt's tokens
    assert given >= 3 and gen.generated_tokens == 3 * (24 - given)
    assert gen.tokens_per_second == pytest.approx(gen.generated_tokens / gen.seconds)


def test_perplexity_does_not_depend_on_the_batch_size(model, text_folder):
    """Each row's times and masks come from its own generator (seed, row), so batching changes nothing."""
    kw = dict(source=str(text_folder), split="val", num_t_samples=2, max_rows=8, seed=3)
    a, b = model.perplexity(batch_size=2, **kw), model.perplexity(batch_size=8, **kw)
    assert a["num_tokens"] == b["num_tokens"] and a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)
    assert model.perplexity(batch_size=8, **{**kw, "seed": 4})["ppl"] != pytest.approx(a["ppl"], rel=1e-5)


@pytest.mark.parametrize("bad", [dict(num_t_samples=0), dict(max_rows=0), dict(max_rows=-1), dict(batch_size=0)])
def test_perplexity_arguments_must_be_positive(model, text_folder, bad):
    with pytest.raises(ValueError, match="must be positive"):
        model.perplexity(source=str(text_folder), split="val", **{"num_t_samples": 1, "max_rows": 4, **bad})


def test_perplexity_of_a_short_text_scores_every_token(model):
    text = "And the king said unto the people."
    n = len(model.encode(text)) + 1  # its tokens and the EOS that ends it
    ppl = model.perplexity(texts=[text], num_t_samples=2)
    assert ppl["num_tokens"] == n and ppl["num_rows"] == 1 and math.isfinite(ppl["ppl"])
    long = model.perplexity(texts=[LONG_TEXT], num_t_samples=1)
    assert long["num_tokens"] == len(model.encode(LONG_TEXT)) + 1  # the tail row is scored too


# ------------------------------------------------------------------------------------ the one generation door
def test_batched_prompts_of_different_lengths_are_left_padded_for_any_sampler(model):
    prompts = ["And the king said unto", "The"]
    for sampler in ("ancestral_cache", "first_hitting", "llada"):
        steps = {} if sampler == "first_hitting" else {"steps": 6}  # first_hitting has no step budget
        gen = model.generate(prompts, gen_length=6, sampler=sampler, seed=1, **steps)
        assert gen.tokens.shape == (2, 1 + len(model.encode(prompts[0])) + 6) and gen.generated.sum(1).tolist() == [6, 6]
        for row, generated, text in zip(gen.tokens, gen.generated, prompts):
            given = [model.tokenizer.bos_token_id] + model.encode(text)
            kept = row[~generated].tolist()
            assert kept[len(kept) - len(given):] == given  # the prompt, after left padding
            assert set(kept[:len(kept) - len(given)]) <= {model.tokenizer.pad_token_id}
            assert not bool((row[generated] == model.tokenizer.mask_token_id).any())
        assert gen.nfe_per_row.shape == (2,) and gen.row_calls >= gen.nfe and len(gen.continuations) == 2


def test_options_a_sampler_does_not_take_are_refused_naming_its_options(model):
    with pytest.raises(ValueError, match=r"sampler 'first_hitting' does not take steps; its options: temperature, top_p"):
        model.generate(num_samples=1, length=12, sampler="first_hitting", steps=6)
    with pytest.raises(ValueError, match=r"sampler 'ddpm' does not accept eta; its options: steps, temperature"):
        model.generate(num_samples=1, length=12, sampler="ddpm", steps=6, eta=0.1)
    with pytest.raises(ValueError, match=r"steps given twice"):
        model.generate(num_samples=1, length=12, sampler="ancestral", steps=6, sampler_options={"steps": 4})
    assert model.sampler_name() == model.process.default_sampler and model.sampler_name("ddpm") == "ancestral"
    assert model.sampler_options("ddpm", ["steps=4", "cache=true"]) == {"steps": 4, "cache": True}
    with pytest.raises(ValueError, match=r"sampler 'ddpm' has no option 'eta'; its options: steps, temperature, top_p"):
        model.sampler_options("ddpm", ["eta=0.1"])


def test_refusals_name_the_sampler_as_typed(model):
    from dlm.process.base import Process

    class Uniform(Process):
        name, corruption = "uniform_refusal", "uniform"

    sampler = model._sampler("remdm_cap", 4, None, None, None, None, {})[0]
    assert sampler.name == "remdm_cap"
    with pytest.raises(ValueError, match="sampler 'remdm_cap' cannot sample a 'uniform_refusal' model"):
        Uniform().check_sampler(sampler)


def test_callback_sees_every_network_call_and_can_stop_rows(model):
    events = []
    gen = model.generate(num_samples=3, length=16, sampler="ancestral", steps=5, callback=events.append)
    assert [e.step for e in events] == list(range(len(events))) and events[-1].nfe == gen.nfe
    assert sum(int(e.committed.sum()) for e in events) == gen.generated_tokens
    stopped = model.generate(num_samples=3, length=16, sampler="ancestral", steps=5,
                             callback=lambda e: torch.tensor([True, False, False]))
    assert stopped.stopped.tolist() == [True, False, False] and stopped.nfe_per_row[0] == 1
    recorded = model.generate(num_samples=2, length=16, steps=5, record_trajectory=True, progress=True)
    assert len(recorded.trajectory) >= 1 and recorded.trajectory[-1].shape == (2, 16)


def test_chat_messages_go_through_the_chat_template(model):
    messages = [{"role": "user", "content": "And the king said"}]
    with pytest.raises(ValueError, match="no chat template"):
        model.generate(messages=messages, gen_length=4)
    tok = copy.deepcopy(model.tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    chat = dlm.pipeline.DiffusionLM(model.network, model.process, tok, model.cfg)
    gen = chat.generate(messages=messages, gen_length=4, steps=4)
    given = gen.tokens[0][~gen.generated[0]].tolist()
    assert given == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    with pytest.raises(ValueError, match="not both"):
        chat.generate("x", messages=messages)


def test_a_sampler_the_process_cannot_serve_is_refused(model):
    with pytest.raises(ValueError, match="cannot sample a 'mdlm' model"):
        model.generate(sampler="autoregressive", length=8)


def test_an_autoregressive_model_checks_then_drops_the_named_samplers_options():
    """`dlm eval MDLM AR --sampler llada -o remasking=margin`: the AR model decodes left to right (as `generate`
    replaces the sampler, with its options); the options are still checked against the sampler named."""
    from dlm.build import build_network, build_process
    from dlm.config import build_config
    from dlm.pipeline import DiffusionLM
    from tests.golden.cases import tokenizer

    tok = tokenizer()
    cfg = build_config(["process=ar", f"data.vocab_size={len(tok)}", "model.n_layer=1", "model.d_model=32",
                        "model.n_head=2", "model.context=16"])
    cfg.model.vocab_size = len(tok)
    ar = DiffusionLM(build_network(cfg), build_process(cfg, tok.mask_token_id), tok, cfg)
    assert ar.sampler_options("llada", ["remasking=margin"]) == {}
    with pytest.raises(ValueError, match=r"sampler 'llada' has no option 'eta'"):
        ar.sampler_options("llada", ["eta=0.1"])
    gen = ar.generate(num_samples=1, length=8, sampler="llada", seed=0, **ar.sampler_options("llada", ["remasking=margin"]))
    assert gen.generated_tokens == 7
