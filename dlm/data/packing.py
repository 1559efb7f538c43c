"""Tokenise documents and pack them into fixed-length rows, with an on-disk cache.

Two layouts, as in MDLM:
  * ``wrap``: documents joined by EOS and cut into rows, each row starting with BOS; no padding, every
    position is a real token (the default for pre-training).
  * ``pad``: one document per row, truncated, then padded; an attention mask marks the real tokens.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerFast

from dlm.data.tokenizer import tokenizer_fingerprint
from dlm.data.ioerrors import os_error_from

PACKINGS = ("wrap", "pad")
_UNWRITABLE: set[str] = set()  # cache folders already reported as not writable in this process
_CACHE_FORMAT = "dlm-tokens-v1"  # bump when the packing rules change, so old caches are not reused


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (BOS plus one token), got {seq_len}")


def pack_wrap(token_lists: list[list[int]], seq_len: int, bos_id: int, eos_id: int) -> torch.Tensor:
    """Concatenate documents and cut them into rows (MDLM's "wrap").

    Each document's ids are followed by EOS; the whole stream is cut into chunks of ``seq_len - 1``
    and every row is ``[BOS] + chunk``; the last partial chunk is dropped. Empty documents are skipped.
    Returns a LongTensor of shape (N, seq_len), N = (number of tokens + number of documents) // (seq_len - 1).
    """
    _check_seq_len(seq_len)
    lengths = np.array([len(t) for t in token_lists if len(t)], dtype=np.int64)  # (D,)
    n_tokens = int(lengths.sum())
    total = n_tokens + len(lengths)  # every document gains one EOS
    n_rows = total // (seq_len - 1)
    if n_rows == 0:
        raise ValueError(
            f"corpus has {n_tokens} tokens ({total} with one EOS per document), fewer than "
            f"seq_len - 1 = {seq_len - 1} needed for one row of seq_len={seq_len}: use more text or a smaller seq_len"
        )
    stream = np.empty(total, dtype=np.int64)
    eos_at = np.cumsum(lengths + 1) - 1  # position of each document's EOS in the stream
    is_token = np.ones(total, dtype=bool)
    is_token[eos_at] = False
    stream[eos_at] = eos_id
    stream[is_token] = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=n_tokens)
    rows = stream[: n_rows * (seq_len - 1)].reshape(n_rows, seq_len - 1)  # (N, seq_len - 1)
    bos = np.full((n_rows, 1), bos_id, dtype=np.int64)
    return torch.from_numpy(np.concatenate([bos, rows], axis=1))  # (N, seq_len)


def pack_wrap_all(token_lists: list[list[int]], seq_len: int, bos_id: int, eos_id: int,
                  pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack_wrap` that keeps every token, for scoring given text: the last partial row is padded, with an
    attention mask (N, seq_len) that is False on the padding. Texts of any length, even one short sentence."""
    _check_seq_len(seq_len)
    stream = [t for ids in token_lists if ids for t in (*ids, eos_id)]
    if not stream:
        raise ValueError("no text to score: every text is empty")
    chunk = seq_len - 1
    rows = [stream[i:i + chunk] for i in range(0, len(stream), chunk)]
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, 0], ids[r, 1:len(row) + 1] = bos_id, torch.tensor(row)
        mask[r, :len(row) + 1] = True
    return ids, mask


def pack_pad(
    token_lists: list[list[int]], seq_len: int, bos_id: int, eos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One document per row: ``[BOS] + doc[:seq_len - 2] + [EOS]``, then PAD to ``seq_len``.

    Empty documents are skipped. Returns ``(input_ids, attention_mask)``, both of shape (N, seq_len):
    a LongTensor, and a BoolTensor that is True on BOS, the document's tokens and EOS, False on padding.
    """
    _check_seq_len(seq_len)
    docs = [t[: seq_len - 2] for t in token_lists if len(t)]
    if not docs:
        raise ValueError("no non-empty documents to pack")
    n = len(docs)
    lengths = np.array([len(d) for d in docs], dtype=np.int64)  # (N,) tokens kept per document
    ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    ids[:, 0] = bos_id
    positions = np.arange(seq_len)[None, :]  # (1, seq_len)
    body = (positions >= 1) & (positions <= lengths[:, None])  # (N, seq_len): where the document goes
    ids[body] = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64, count=int(lengths.sum()))
    ids[np.arange(n), lengths + 1] = eos_id
    mask = positions <= (lengths + 1)[:, None]  # (N, seq_len)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def tokenize_texts(
    texts: list[str], tokenizer: PreTrainedTokenizerFast, num_proc: int = 1, batch_size: int = 64
) -> list[list[int]]:
    """Token ids of each text, without special tokens.

    Text that happens to spell a special token (e.g. "[MASK]" or "<|endoftext|>") is encoded as
    ordinary text, so the mask id only ever comes from the diffusion process, never from the data.
    The Rust tokenizer already uses all cores within a batch; ``num_proc > 1`` also runs that many
    batches at once in threads.
    """
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]

    def encode(batch: list[str]) -> list[list[int]]:
        # verbose=False: documents longer than model_max_length are fine here, they are packed later.
        out = tokenizer(batch, add_special_tokens=False, split_special_tokens=True, verbose=False)
        return out["input_ids"]

    if num_proc > 1:
        with ThreadPoolExecutor(max_workers=num_proc) as pool:
            encoded = list(pool.map(encode, batches))
    else:
        encoded = [encode(b) for b in batches]
    return [ids for batch in encoded for ids in batch]


def default_cache_dir() -> Path:
    """``$DLM_CACHE/tokens`` if ``DLM_CACHE`` is set, else ``~/.cache/dlm/tokens``."""
    root = os.environ.get("DLM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "dlm") / "tokens"


def _cache_key(texts: list[str], tokenizer: PreTrainedTokenizerFast, seq_len: int, packing: str) -> str:
    h = hashlib.sha256()
    for t in texts:
        data = t.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))  # length prefix: ["ab", "c"] and ["a", "bc"] differ
        h.update(data)
    parts = [_CACHE_FORMAT, h.hexdigest(), tokenizer_fingerprint(tokenizer), str(seq_len), packing]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _read_cache(path: Path, key: str, seq_len: int, packing: str) -> dict[str, torch.Tensor | None] | None:
    """The cached dataset, or None if the file is missing; a damaged file is reported and ignored."""
    try:
        if not path.exists():
            return None
    except OSError:  # an unreadable cache folder: as if empty
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                raise ValueError("it was written for other data (key mismatch)")
            ids = f.get_tensor("input_ids")
            mask = f.get_tensor("attention_mask") if "attention_mask" in f.keys() else None
        if ids.dtype != torch.int64 or ids.ndim != 2 or ids.shape[1] != seq_len or ids.shape[0] == 0:
            raise ValueError(f"input_ids has dtype {ids.dtype} and shape {tuple(ids.shape)}")
        if (packing == "pad") != (mask is not None) or (mask is not None and mask.shape != ids.shape):
            raise ValueError("attention_mask missing or of the wrong shape")
    except Exception as e:  # safetensors raises its own error types on truncated or garbled files
        warnings.warn(f"token cache {path} is unreadable ({type(e).__name__}: {e}); rebuilding it", stacklevel=3)
        return None
    return {"input_ids": ids, "attention_mask": mask.bool() if mask is not None else None}


def _write_cache(path: Path, data: dict[str, torch.Tensor | None], key: str) -> None:
    """Write through a temporary file and an atomic rename: a killed run leaves no half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    tensors = {k: v.contiguous() for k, v in data.items() if v is not None}
    try:
        try:
            save_file(tensors, str(tmp), metadata={"key": key, "format": _CACHE_FORMAT})
        except Exception as e:  # safetensors' own error type for a full disk: an OSError for the caller
            os_error = os_error_from(e, path)
            if os_error is None:
                raise
            raise os_error from e
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_token_dataset(
    texts: list[str],
    tokenizer: PreTrainedTokenizerFast,
    seq_len: int,
    packing: str = "wrap",
    cache_dir: str | Path | None = None,
) -> dict[str, torch.Tensor | None]:
    """Tokenise and pack ``texts`` into rows of ``seq_len`` tokens, cached on disk.

    Returns ``{"input_ids": LongTensor (N, seq_len), "attention_mask": BoolTensor (N, seq_len) or None}``
    (the mask is None for ``wrap``, where every position is a real token). The cache file, under
    ``cache_dir`` (default ``default_cache_dir()``), is keyed by the texts' content, the tokenizer's
    fingerprint, ``seq_len`` and ``packing``; an unreadable cache file is rebuilt with a warning.
    """
    if packing not in PACKINGS:
        raise ValueError(f"unknown packing {packing!r}: use one of {', '.join(PACKINGS)}")
    _check_seq_len(seq_len)
    key = _cache_key(texts, tokenizer, seq_len, packing)
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"{key}.safetensors"
    cached = _read_cache(path, key, seq_len, packing)
    if cached is not None:
        return cached

    needed = ["bos_token_id", "eos_token_id"] + (["pad_token_id"] if packing == "pad" else [])
    missing = [n for n in needed if getattr(tokenizer, n) is None]
    if missing:
        raise ValueError(f"tokenizer lacks {', '.join(missing)}: load it with dlm.data.load_tokenizer, which adds them")
    token_lists = tokenize_texts(texts, tokenizer)
    ids = {"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id}
    if packing == "wrap":
        data = {"input_ids": pack_wrap(token_lists, seq_len, **ids), "attention_mask": None}
    else:
        input_ids, mask = pack_pad(token_lists, seq_len, pad_id=tokenizer.pad_token_id, **ids)
        data = {"input_ids": input_ids, "attention_mask": mask}
    try:
        _write_cache(path, data, key)
    except OSError as e:  # a read-only or full disk: the cache is an optimisation, the run goes on without it
        if str(path.parent) in _UNWRITABLE:  # one warning per folder (a run builds its train and validation rows)
            return data
        _UNWRITABLE.add(str(path.parent))
        warnings.warn(f"token cache {path.parent} is not writable ({e.strerror or e}): continuing without the cache "
                      "(set DLM_CACHE or data.cache_dir to a writable folder to keep tokenised data)", stacklevel=2)
    return data
