"""The data of dlm's offline lm-eval tasks (`dlm/eval/harness/tasks/*.yaml`): JSONL files made deterministically
from the embedded corpus's held-out (test) split, and Sudoku puzzles from dlm's task generator.

    python -m dlm.eval.harness data [--out DIR]      # writes them (the tasks also write them on first use)

Files (in `data_dir()`: $DLM_HARNESS_DATA, else ~/.cache/dlm/harness):
  ppl.jsonl           {"text"}: passages of ~600-1,200 characters cut at line ends (rolling perplexity)
  cloze.jsonl         {"context", "target"}: the text before a line's (or sentence's) last word, up to ~400
                      characters, and that word (letters only), LAMBADA-style
  continuation.jsonl  {"context", "target"}: text up to a line's (or sentence's) end, and the first 3 words
                      of the next one
  sudoku.jsonl        {"puzzle", "solution", "givens", "nodes"}: 4x4 test puzzles, 6 givens, seed 0 (the
                      demo's `runs/sudoku4-data` generator: dlm.tasks.sudoku)
Which units are kept is decided by a hash of their text, so the files do not depend on the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

SIZES = {"ppl": 100, "cloze": 200, "continuation": 200, "sudoku": 100}
VERSION = 1  # written into every row: the tasks refuse files of another version
CONTEXT_CHARS = 400
SUDOKU = {"size": 4, "givens": 6, "seed": 0}


def data_dir() -> Path:
    """Where the task files live: $DLM_HARNESS_DATA, else $XDG_CACHE_HOME/dlm/harness (~/.cache/dlm/harness)."""
    if os.environ.get("DLM_HARNESS_DATA"):
        return Path(os.environ["DLM_HARNESS_DATA"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "dlm" / "harness"


def _rank(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _pick(items: list, n: int, key) -> list:
    """The n items of smallest text hash, in their original order (deterministic, spread over the corpus)."""
    keep = set(sorted(range(len(items)), key=lambda i: _rank(key(items[i])))[:n])
    return [x for i, x in enumerate(items) if i in keep]


def units(doc: str) -> list[tuple[int, int]]:
    """(start, end) character spans of a document's units: its lines, and within a long line (prose) its
    sentences (ending in . ; : ? or ! before a space)."""
    spans = []
    for m in re.finditer(r"[^\n]+", doc):
        a, line = m.start(), m.group()
        if len(line) <= 200:
            spans.append((a, a + len(line.rstrip())))
            continue
        prev = 0
        for s in re.finditer(r"[.;:?!](?= )", line):
            spans.append((a + prev, a + s.end()))
            prev = s.end() + 1
        if prev < len(line):
            spans.append((a + prev, a + len(line.rstrip())))
    return [(a, b) for a, b in spans if b > a]


def _context_before(doc: str, a: int) -> str:
    """Up to CONTEXT_CHARS characters of the document before position a, starting at a word boundary."""
    start = max(0, a - CONTEXT_CHARS)
    text = doc[start:a]
    if start > 0 and " " in text:
        text = text[text.index(" ") + 1:]
    return text


def cloze_rows(docs: list[str]) -> list[dict]:
    rows = []
    for doc in docs:
        for a, b in units(doc):
            unit = doc[a:b]
            words = unit.split(" ")
            last = re.sub(r"[^A-Za-z]+$", "", words[-1])
            if not (8 <= len(words) <= 60 and len(last) >= 3 and last.isalpha()):
                continue
            head = unit[:len(unit) - len(words[-1])].rstrip(" ")
            rows.append({"context": _context_before(doc, a) + head, "target": " " + last})
    return rows


def continuation_rows(docs: list[str]) -> list[dict]:
    rows = []
    for doc in docs:
        spans = units(doc)
        for (a, b), (c, d) in zip(spans, spans[1:]):
            words = doc[c:d].split()
            if len(words) < 4 or b - a < 20 or not all(re.fullmatch(r"[A-Za-z',;:.!?-]+", w) for w in words[:3]):
                continue
            newline = "\n" in doc[b:c]  # a line-structured text: the context ends with the line break
            rows.append({"context": _context_before(doc, b) + ("\n" if newline else ""), "target": " ".join(words[:3])})
    return rows


def ppl_rows(docs: list[str]) -> list[dict]:
    rows = []
    for doc in docs:
        start, end = 0, 0
        for m in re.finditer(r"\n", doc):
            end = m.start()
            if end - start >= 600:
                piece = doc[start:end].strip()
                if 600 <= len(piece) <= 1200:
                    rows.append({"text": piece})
                start = end + 1
    return rows


def sudoku_rows() -> list[dict]:
    from dlm.tasks.sudoku import Sudoku

    task = Sudoku(SUDOKU["size"], SUDOKU["givens"])
    return [{**ex, "size": SUDOKU["size"]} for ex in task.generate("test", SIZES["sudoku"], SUDOKU["seed"])]


def build(name: str) -> list[dict]:
    """The rows of one task file (a pure function of the embedded corpus and the code)."""
    if name == "sudoku":
        return sudoku_rows()
    from dlm.data.corpus import load_texts

    docs = load_texts("embedded", split="test")
    rows = {"ppl": ppl_rows, "cloze": cloze_rows, "continuation": continuation_rows}[name](docs)
    key = (lambda r: r["text"]) if name == "ppl" else (lambda r: r["context"] + r["target"])
    return _pick(rows, SIZES[name], key)


def write_task_data(folder: str | Path | None = None, force: bool = False, names=None) -> dict[str, Path]:
    """Write the task files (`names`, default all four) into `folder` (default `data_dir()`); existing files of
    this VERSION are kept unless force. Returns name -> path."""
    folder = Path(folder) if folder is not None else data_dir()
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names or SIZES:
        path = folder / f"{name}.jsonl"
        if force or not _current(path):
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({**r, "version": VERSION}) + "\n" for r in build(name)))
            tmp.replace(path)
        out[name] = path
    return out


def _current(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open() as f:
        first = f.readline()
    try:
        return json.loads(first).get("version") == VERSION
    except json.JSONDecodeError:
        return False


def read_rows(name: str) -> list[dict]:
    """The rows of one task file, written first when missing."""
    path = write_task_data(names=[name])[name]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
