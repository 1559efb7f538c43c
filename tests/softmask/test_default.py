"""A model trained with soft-masking is sampled with it by default (the process's feedback, attached by
`DiffusionLM.generate`), and the flags of `dlm sample` / `dlm eval` that turn it on and off."""

import pytest

from dlm.cli import build_parser, feedback_option, feedback_words, softmask_option

KW = dict(num_samples=2, length=24, steps=8, seed=5, precision="32", temperature=1.0, top_p=1.0)


@pytest.fixture(scope="module")
def models():
    from tests.golden.cases import models

    return models()


@pytest.mark.parametrize("sampler", ["ancestral", "ancestral_cache", "remdm_loop"])
def test_the_default_is_the_learned_soft_masking_and_false_is_plain(models, sampler):
    sm = models["sm"]
    default = sm.generate(sampler=sampler, **KW)
    explicit = sm.generate(sampler=sampler, softmask=True, **KW)
    assert default.tokens.tolist() == explicit.tokens.tolist() and default.nfe == explicit.nfe
    off = sm.generate(sampler=sampler, softmask=False, **KW)
    assert off.tokens.tolist() == sm.generate(sampler=sampler, feedback=False, **KW).tokens.tolist()
    assert off.tokens.tolist() != default.tokens.tolist()
    # plain masks are exactly the base MDLM's (the golden "sm" model shares mdlm's network)
    assert off.tokens.tolist() == models["mdlm"].generate(sampler=sampler, **KW).tokens.tolist()


def test_a_model_without_feedback_is_sampled_plain(models):
    for name in ("mdlm", "bd3lm", "ar"):
        assert models[name].feedback_for() is None
    assert models["mdlm"].feedback_for(softmask=dict(omega_s=0.5)).label == "soft-masking"
    with pytest.raises(ValueError, match="autoregressive"):
        models["ar"].feedback_for(softmask=True)


@pytest.mark.parametrize("flags, softmask, feedback, words", [
    ([], None, None, ", soft-masking"),
    (["--softmask"], {"schedule": "none"}, None, ", soft-masking"),
    (["--no-softmask"], False, None, ""),
    (["--no-feedback"], None, False, ""),
    (["--softmask", "--omega-s", "0.3"], {"omega_s": 0.3, "schedule": "none"}, None, ", soft-masking"),
])
def test_the_sample_flags(models, flags, softmask, feedback, words):
    args = build_parser().parse_args(["sample", "MODEL", *flags])
    assert softmask_option(args) == softmask and feedback_option(args) == feedback
    assert feedback_words(models["sm"], args) == words


@pytest.mark.parametrize("flags, message", [(["--softmask", "--no-feedback"], "contradict"),
                                            (["--no-softmask", "--omega-s", "0.5"], "add --softmask")])
def test_contradicting_flags_are_refused(flags, message):
    args = build_parser().parse_args(["sample", "MODEL", *flags])
    with pytest.raises(ValueError, match=message):
        softmask_option(args)
