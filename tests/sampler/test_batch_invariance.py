"""Batch invariance, for every registered sampler and every process it serves (float32, one thread): a request
gives the same tokens alone, as any row of a batch of 3, and beside prompts of other lengths — each row draws from
its own generator, seeded by its request (`DiffusionLM.generate(seed=)`), never by its place in the batch — and a
text's NELBO estimate does not depend on its place in the list."""

import pytest
import torch

from tests.sampler.test_padding import CASES, GEN, PROMPTS, models, one_thread, options  # noqa: F401 (fixtures)


def generate(model, name, prompts, seed):
    return model.generate(prompts, gen_length=GEN, sampler=name, seed=seed, precision="32",
                          **options(name, model)).tokens[:, -GEN:]


@pytest.mark.parametrize("name,model_name", CASES)
def test_a_request_gives_the_same_tokens_alone_and_in_any_batch(models, name, model_name):
    model = models[model_name]
    alone = {(p, s): generate(model, name, [p], s)[0] for p, s in ((PROMPTS[0], 7), (PROMPTS[1], 8), (PROMPTS[2], 9))}
    for order in ((0, 1, 2), (2, 0, 1), (1, 2, 0)):  # every request at every place, beside prompts of other lengths
        prompts = [PROMPTS[i] for i in order]
        seeds = [7 + i for i in order]
        batch = generate(model, name, prompts, seeds)
        for row, (p, s) in enumerate(zip(prompts, seeds)):
            assert torch.equal(batch[row], alone[(p, s)]), (name, model_name, order, row)


def test_seed_is_one_or_one_per_prompt(models):
    model = models["mdlm"]
    with pytest.raises(ValueError, match="one integer per prompt"):
        model.generate(PROMPTS[:2], gen_length=4, steps=2, seed=[1, 2, 3])
    one = model.generate(PROMPTS[:2], gen_length=8, steps=4, seed=3, sampler="ancestral", precision="32").tokens
    each = model.generate(PROMPTS[:2], gen_length=8, steps=4, seed=[3, 3], sampler="ancestral", precision="32").tokens
    assert torch.equal(one, each)
    two = model.generate(PROMPTS[:1], num_samples=2, gen_length=8, steps=4, seed=3, sampler="ancestral",
                         precision="32").tokens
    assert not torch.equal(two[0], two[1])  # the samples of one request differ


def test_nelbo_of_a_text_does_not_depend_on_its_place(models):
    from dlm.data.batch import make_batch

    model = models["mdlm"]
    rows = [[model.tokenizer.bos_token_id] + model.encode(t)[:15] for t in PROMPTS]
    rows = [r + [model.tokenizer.pad_token_id] * (16 - len(r)) for r in rows]
    ids = torch.tensor(rows)
    am = ids != model.tokenizer.pad_token_id
    am[:, 0] = True
    alone = model.nelbo(make_batch(ids[2:3], am[2:3]), num_t_samples=2, seed=4, precision="32")
    first = model.nelbo(make_batch(ids[[2, 0]], am[[2, 0]]), num_t_samples=2, seed=4, precision="32")
    last = model.nelbo(make_batch(ids[[0, 1, 2]], am[[0, 1, 2]]), num_t_samples=2, seed=4, precision="32")
    others = model.nelbo(make_batch(ids[[0, 1]], am[[0, 1]]), num_t_samples=2, seed=4, precision="32")
    only_0 = model.nelbo(make_batch(ids[[0]], am[[0]]), num_t_samples=2, seed=4, precision="32")
    assert first[0] - only_0[0] == pytest.approx(alone[0], rel=1e-5)
    assert last[0] - others[0] == pytest.approx(alone[0], rel=1e-5)
