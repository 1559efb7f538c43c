"""Text sources: the embedded public-domain corpus, local files and folders, Hugging Face datasets.

Everything ends up as a list of documents (strings); packing into fixed-length rows happens later
(``dlm.data.packing``). Splits are made by whole documents so no document leaks between train and val.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

SPLITS = ("train", "val", "test")
HF_PREFIX = "hf:"
# Hugging Face "packaged" builders that read local data files: "hf:json:path/to/file.jsonl".
HF_FILE_BUILDERS = ("json", "csv", "text", "parquet", "arrow")


@dataclass(frozen=True)
class Document:
    """One document: ``id`` is stable and unique (it decides the split), ``source`` names its origin."""

    id: str
    source: str
    title: str
    text: str


# ---------------------------------------------------------------- embedded corpus

def embedded_corpus_path() -> Path:
    """Where ``corpus.jsonl.gz`` lies (next to this module; built by ``scripts/build_corpus.py``)."""
    return Path(str(resources.files("dlm.data") / "corpus" / "corpus.jsonl.gz"))


@functools.lru_cache(maxsize=1)
def _read_embedded(path: str) -> tuple[Document, ...]:
    fix = "reinstall dlm, or rebuild it with `python scripts/build_corpus.py`"
    if not Path(path).is_file():
        raise FileNotFoundError(f"embedded corpus not found at {path}: {fix}")
    docs = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                docs.append(Document(id=d["id"], source=d["source"], title=d["title"], text=d["text"]))
    except (EOFError, OSError, zlib.error, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        # EOFError: truncated gzip; BadGzipFile (an OSError) / zlib.error: corrupt bytes or CRC mismatch.
        raise RuntimeError(f"embedded corpus {path} is corrupt or truncated ({type(e).__name__}: {e}); {fix}") from e
    if not docs:
        raise RuntimeError(f"embedded corpus {path} is empty; {fix}")
    return tuple(docs)


def load_embedded_corpus() -> list[Document]:
    """The embedded corpus: 174 public-domain documents (Shakespeare, King James Bible, World English
    Bible; one per work or book), sorted by id. See ``dlm/data/corpus/PROVENANCE.md``."""
    return list(_read_embedded(str(embedded_corpus_path())))


# ---------------------------------------------------------------- splits

def _unit_hash(key: str) -> float:
    """A stable number in [0, 1) from a string (sha256, so it is the same on every machine and run)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_documents(
    docs: list[Document],
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    group: Callable[[Document], str] | None = None,
) -> dict[str, list[Document]]:
    """Split documents into ``{"train", "val", "test"}`` by a hash of each document's id.

    A document's split depends only on its own key, ``group(doc)`` or else its id (test if the key's
    sha256, as a number in [0, 1), is < ``test_fraction``, val if < ``test_fraction + val_fraction``,
    else train), so adding documents never moves the others; documents with the same key share a split.
    With 3 or more keys, val and test (when their fraction is > 0) and train each get at least one: the
    keys with the smallest hashes are moved. Input order is kept within each split.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= val_fraction, test_fraction and a sum < 1, got {val_fraction}, {test_fraction}")
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        raise ValueError("document ids must be unique: the split is decided by the id")
    keys = [group(d) if group else d.id for d in docs]
    ranked = sorted(set(keys), key=lambda k: (_unit_hash(k), k))
    hashes = [_unit_hash(k) for k in ranked]
    n_test = sum(h < test_fraction for h in hashes)
    n_val = sum(test_fraction <= h < test_fraction + val_fraction for h in hashes)
    if len(ranked) >= 3:
        # Taking the next keys in hash order keeps the threshold rule whenever it already works.
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
        while n_test + n_val > len(ranked) - 1:  # train keeps at least one key
            if n_val >= n_test:  # the larger of the two is >= 2 here, so neither drops below 1
                n_val -= 1
            else:
                n_test -= 1
    which = {k: "test" if r < n_test else "val" if r < n_test + n_val else "train" for r, k in enumerate(ranked)}
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d, k in zip(docs, keys):
        out[which[k]].append(d)
    return out


def embedded_group(doc: Document) -> str:
    """Split key of the embedded corpus: a Bible book's two translations (KJV, WEB) share a split, so
    a model never sees in training a book that it is evaluated on in the other translation."""
    if doc.source in ("kjv", "web"):
        return "bible/" + doc.id.split("/", 1)[1]
    return doc.id


def _split_contiguous(text: str, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """For sources with fewer than 3 documents: contiguous ranges, like text8's split by position:
    the first lines for train, then val, then the last lines for test (words instead of lines when
    the text has fewer than 20 lines, as text8 has one; 64-character runs when it has fewer than 20 words
    too). The three parts concatenate to ``text``."""
    units = text.splitlines(keepends=True)
    if len(units) < 20:
        units = re.split(r"(?<= )", text)  # words, each keeping its trailing space
    if len(units) < 20:  # text without spaces (Chinese, Japanese, ...): runs of 64 characters
        units = [text[i:i + 64] for i in range(0, len(text), 64)]
    n = len(units)
    n_test = max(1, round(n * test_fraction)) if n >= 3 and test_fraction > 0 else 0
    n_val = max(1, round(n * val_fraction)) if n >= 3 and val_fraction > 0 else 0
    cut_val, cut_test = n - n_test - n_val, n - n_test
    return {
        "train": "".join(units[:cut_val]),
        "val": "".join(units[cut_val:cut_test]),
        "test": "".join(units[cut_test:]),
    }


def _select_split(docs: list[Document], split: str, origin: str,
                  group: Callable[[Document], str] | None = None) -> list[str]:
    val_fraction = test_fraction = 0.05
    if len(docs) >= 3:
        texts = [d.text for d in split_documents(docs, val_fraction, test_fraction, group)[split]]
    else:
        texts = [_split_contiguous(d.text, val_fraction, test_fraction)[split] for d in docs]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(
            f"no text for split {split!r} in {origin}: it is too short to split "
            f"(give at least 3 documents, or a longer text)"
        )
    return texts


def _text_group(doc: Document) -> str:
    """Split key for rows without a natural name (JSONL lines, dataset rows): their content. The split
    then does not depend on row order, and duplicated texts share a split (no train/val leak)."""
    return hashlib.sha256(doc.text.encode("utf-8")).hexdigest()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


# ---------------------------------------------------------------- local files

def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); convert it with e.g. `iconv -t utf-8`") from e


def _folder_documents(folder: Path) -> list[Document]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md"))
    docs = [Document(p.relative_to(folder).as_posix(), "folder", p.stem, _read_text_file(p)) for p in files]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"no text found in folder {folder} (looked for non-empty *.txt and *.md files, recursively)")
    return docs


def _jsonl_documents(path: Path, text_field: str) -> list[Document]:
    """Documents from a JSON Lines file, or a .json file holding a list of objects (or JSON Lines)."""
    raw = _read_text_file(path)
    records: list[tuple[int, object]]
    try:
        whole = json.loads(raw) if path.suffix.lower() == ".json" else None
    except json.JSONDecodeError:
        whole = None  # a .json file in JSON Lines format (what `datasets` writes)
    if isinstance(whole, list):
        records = [(i + 1, r) for i, r in enumerate(whole)]
        where = "item"
    else:
        records, where = [], "line"
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from e
    docs = []
    for lineno, rec in records:
        if not isinstance(rec, dict) or text_field not in rec:
            fields = ", ".join(map(str, rec)) if isinstance(rec, dict) else type(rec).__name__
            raise ValueError(
                f"{path}: {where} {lineno} has no field {text_field!r} (it has: {fields}); "
                f"pass text_field=<the field holding the text>"
            )
        text = rec[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{path}: {where} {lineno}: field {text_field!r} is {type(text).__name__}, not a string")
        if text.strip():
            docs.append(Document(f"{where} {lineno}", "jsonl", path.name, text))
    if not docs:
        raise ValueError(f"no text found in {path} (field {text_field!r} is empty on every {where})")
    return docs


# ---------------------------------------------------------------- Hugging Face datasets

def _hf_split_name(available: list[str], split: str) -> str | None:
    candidates = {"train": ["train"], "val": ["validation", "val", "valid", "dev"], "test": ["test"]}[split]
    return next((c for c in candidates if c in available), None)


def _load_hf(spec: str, split: str, text_field: str) -> list[str]:
    """``spec`` without the ``hf:`` prefix: ``builder:data_files``, ``name``, ``name:config`` or a folder."""
    import datasets  # slow to import: only when asked for

    name, _, rest = spec.partition(":")
    fix = ("check the name (Hugging Face Hub downloads need network access), or use a local source: "
           "a .txt file, a folder of .txt/.md files, a .jsonl file, or 'hf:json:path/to/file.jsonl'")
    try:
        if Path(spec).is_dir() and any((Path(spec) / f).exists() for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(spec)  # a folder written by save_to_disk
        elif name in HF_FILE_BUILDERS and rest:
            if not Path(rest).exists():
                raise FileNotFoundError(f"data file {rest!r} does not exist")
            ds = datasets.load_dataset(name, data_files=rest)
        else:
            ds = datasets.load_dataset(name, rest or None)
    except Exception as e:  # datasets raises many types (offline, not found, bad config): one clear message
        raise ValueError(f"could not load Hugging Face dataset {spec!r}: {type(e).__name__}: {e}; {fix}") from e
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    available = list(ds.keys())
    first = ds[available[0]]
    if text_field not in first.column_names:
        raise ValueError(
            f"dataset {spec!r} has no column {text_field!r} (columns: {', '.join(first.column_names)}); "
            f"pass text_field=<the column holding the text>"
        )
    if len(available) == 1:  # one split only: make train/val/test from its rows, as for local files
        rows = [t for t in first[text_field] if isinstance(t, str) and t.strip()]
        docs = [Document(f"row {i}", "hf", spec, t) for i, t in enumerate(rows)]
        if not docs:
            raise ValueError(f"no text found in dataset {spec!r} (column {text_field!r})")
        return _select_split(docs, split, f"dataset {spec!r}", _text_group)
    hf_split = _hf_split_name(available, split)
    if hf_split is None:
        raise ValueError(f"dataset {spec!r} has no {split!r} split (it has: {', '.join(available)})")
    texts = [t for t in ds[hf_split][text_field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"no text found in split {hf_split!r} of dataset {spec!r} (column {text_field!r})")
    return texts


# ---------------------------------------------------------------- entry point

def load_texts(source: str, split: str = "train", text_field: str = "text") -> list[str]:
    """Documents of one split of a text source, as a list of non-empty strings.

    ``source`` is one of:
      * ``"embedded"``: the embedded public-domain corpus, split by ``split_documents`` (``embedded_group``);
      * a ``.txt`` / ``.md`` file: one document;
      * a folder: every ``*.txt`` and ``*.md`` file in it, recursively, sorted by path, one document each
        (a folder written by ``datasets``' ``save_to_disk`` is loaded as a dataset instead);
      * a ``.jsonl`` / ``.json`` file: one document per line (or per item of a JSON list), the text in
        field ``text_field``;
      * ``"hf:<builder>:<data files>"``: local files through ``datasets.load_dataset(builder, data_files=...)``,
        builder one of json, csv, text, parquet, arrow, e.g. ``"hf:csv:data/train.csv"``;
      * ``"hf:<name>[:<config>]"`` or just ``"<name>[:<config>]"``: a Hugging Face dataset, e.g.
        ``"wikitext:wikitext-2-raw-v1"`` (the ``"val"`` split maps to ``"validation"``), or ``"hf:<folder>"``.

    Sources with a single split are split here, deterministically: by document when there are 3 or
    more (a hash of the file's path in a folder, of the text for JSON lines and dataset rows), else by
    contiguous lines, or words for text with few lines (first 90% train, next 5% val, last 5% test).
    """
    _check_split(split)
    if source == "embedded":
        return _select_split(load_embedded_corpus(), split, "the embedded corpus", embedded_group)
    if source.startswith(HF_PREFIX):
        return _load_hf(source[len(HF_PREFIX):], split, text_field)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _load_hf(str(path), split, text_field)
        return _select_split(_folder_documents(path), split, f"folder {path}")
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix in (".jsonl", ".json"):
            return _select_split(_jsonl_documents(path, text_field), split, str(path), _text_group)
        text = _read_text_file(path)
        if not text.strip():
            raise ValueError(f"no text found in {path} (the file is empty)")
        return _select_split([Document(path.name, "file", path.stem, text)], split, str(path))
    if suffix in (".txt", ".md", ".jsonl", ".json") or "/" in source or source.startswith("."):
        hint = (f"; for the Hugging Face dataset of that name write hf:{source}" if "/" in source
                and not source.startswith((".", "/", "~")) and not Path(source.split(":")[0]).parent.exists() else "")
        raise FileNotFoundError(f"no such file or folder: {source!r} (check the path, relative to {Path.cwd()})"
                                + hint)
    return _load_hf(source, split, text_field)
