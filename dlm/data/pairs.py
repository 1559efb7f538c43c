"""Prompt -> response pairs for supervised fine-tuning (SFT): JSONL reading, tokenisation, masks, length buckets.

One JSON object per line, either
    {"prompt": "...", "response": "..."}        -> [BOS] prompt response [EOS]
    {"messages": [{"role": ..., "content": ...}, ...]}   -> the tokenizer's chat template; only assistant turns
                                                            (with the template's end-of-turn tokens) are responses;
                                                            no EOS is added (the end-of-turn token ends it)
Every row is one pair: no packing across pairs. A batch is a dict in dlm's format (dlm.data.batch.make_batch):
    input_ids       (B, L) long   the rows, right-padded to the longest row of the batch
    given           (B, L) bool   prompt positions (BOS, prompt, user turns, template text): never noised, never scored
    loss_mask       (B, L) bool   response positions, the padding included (see below); never position 0
    attention_mask  (B, L) bool   only when padding with [PAD] (pad_with="pad"); absent means every position attended
Padding follows LLaDA's SFT recipe (Nie et al., arXiv 2502.09992, §2.4): a row is right-padded with EOS tokens
that are part of the response — noised, scored, attended — so the model learns where a response stops (at
sampling, what follows the first EOS is dropped). pad_with="pad" instead pads with [PAD], not attended, not scored.
Rows are grouped by length (`LengthBucketBatchSampler`) so that little padding is spent. `pair_split` reads one
split of a pair source (a folder of split files, or one file split by hash); `dlm train data.format=pairs` trains
on them (dlm/train/data_module.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dlm.data.batch import make_batch


def read_pairs(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL file, each checked to be a pair or a conversation (errors name the line)."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from e
            ok = isinstance(obj, dict) and (
                (isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str))
                or (isinstance(obj.get("messages"), list) and obj["messages"]))
            if not ok:
                raise ValueError(f"{path}:{n}: a pair line is {{\"prompt\": str, \"response\": str}} or "
                                 f"{{\"messages\": [{{\"role\", \"content\"}}, ...]}}, got keys {sorted(obj) if isinstance(obj, dict) else type(obj).__name__}")
            out.append(obj)
    return out


def tokenize_pair(tokenizer, pair: dict) -> tuple[list[int], list[bool]]:
    """(ids, response) of one pair: token ids and, per token, whether it is response (scored, not given)."""
    if "messages" in pair:
        return _tokenize_messages(tokenizer, pair["messages"])
    prompt = tokenizer.encode(pair["prompt"], add_special_tokens=False)
    response = tokenizer.encode(pair["response"], add_special_tokens=False)
    ids = [tokenizer.bos_token_id] + prompt + response + [tokenizer.eos_token_id]  # the response ends with EOS
    return ids, [False] * (1 + len(prompt)) + [True] * (len(response) + 1)


def _tokenize_messages(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """A conversation through the chat template; the characters of each assistant turn (from the end of the
    rendered history with the generation prompt to the end of the rendered turn) are the response."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("a {\"messages\"} pair needs a tokenizer with a chat template (tokenizer.chat_template); "
                         "use {\"prompt\", \"response\"} pairs with this tokenizer")
    if messages[-1].get("role") != "assistant":
        raise ValueError(f"a conversation must end with an assistant turn (the response), it ends with "
                         f"{messages[-1].get('role')!r}")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True) if k else ""
        through = tokenizer.apply_chat_template(messages[:k + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError("the chat template does not render a conversation as the concatenation of its turns; "
                             "its assistant turns cannot be located (use {\"prompt\", \"response\"} pairs)")
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    response = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), response


class PairDataset(torch.utils.data.Dataset):
    """Tokenised pairs; item i is the index i, `collate` builds the padded batch (see the module docstring)."""

    def __init__(self, rows: list[tuple[list[int], list[bool]]], eos_id: int, pad_id: int | None = None,
                 pad_with: str = "eos", multiple: int = 1):
        """multiple: a batch's length is rounded up to a multiple of it (a block-diffusion model's block size)."""
        if pad_with not in ("eos", "pad"):
            raise ValueError(f"pad_with is 'eos' (LLaDA's recipe: the padding is scored) or 'pad', got {pad_with!r}")
        if pad_with == "pad" and pad_id is None:
            raise ValueError("pad_with='pad' needs the tokenizer's pad_id")
        self.rows, self.eos_id, self.pad_id, self.pad_with = rows, eos_id, pad_id, pad_with
        self.multiple = multiple
        self.lengths = [len(ids) for ids, _ in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, indices: list[int]) -> dict:
        """The batch of rows `indices`, right-padded to the longest of them."""
        length = max(self.lengths[i] for i in indices)
        length = -(-length // self.multiple) * self.multiple
        eos = self.pad_with == "eos"
        fill = self.eos_id if eos else self.pad_id
        ids, resp, real = [], [], []
        for i in indices:  # plain lists, one tensor each at the end (faster than a tensor per row)
            row, r = self.rows[i]
            pad = length - len(row)
            ids.append(row + [fill] * pad)
            resp.append(r + [eos] * pad)  # EOS padding is response; [PAD] padding is not
            real.append([True] * len(row) + [False] * pad)
        input_ids = torch.tensor(ids, dtype=torch.long)  # (B, L)
        response = torch.tensor(resp, dtype=torch.bool)  # (B, L)
        real = torch.tensor(real, dtype=torch.bool)  # (B, L) not padding
        batch = make_batch(input_ids, None if eos else real, score_mask=response)
        batch["given"] = ~response & real  # padding is never given
        return batch


def load_pairs(path: str | Path, tokenizer, max_length: int | None = None, drop_long: bool = False,
               pad_with: str = "eos") -> PairDataset:
    """Read and tokenise a JSONL file of pairs. Rows longer than `max_length` are an error, or are dropped with
    `drop_long=True` (never truncated: a cut response would teach the model to stop mid-answer)."""
    return tokenize_pairs(read_pairs(path), tokenizer, max_length, drop_long, pad_with, str(path))


def tokenize_pairs(pairs: list[dict], tokenizer, max_length: int | None = None, drop_long: bool = False,
                   pad_with: str = "eos", origin: str = "the pairs", multiple: int = 1) -> PairDataset:
    """`load_pairs` of pairs already read (`origin` names them in errors)."""
    plain = [i for i, p in enumerate(pairs) if "messages" not in p]
    rows: list = [None] * len(pairs)
    if plain:  # one batched call per side (the fast tokenizer's threads), same ids as tokenize_pair
        prompts = tokenizer([pairs[i]["prompt"] for i in plain], add_special_tokens=False)["input_ids"]
        responses = tokenizer([pairs[i]["response"] for i in plain], add_special_tokens=False)["input_ids"]
        for i, p, r in zip(plain, prompts, responses):
            rows[i] = ([tokenizer.bos_token_id] + p + r + [tokenizer.eos_token_id],
                       [False] * (1 + len(p)) + [True] * (len(r) + 1))
    for i, p in enumerate(pairs):
        if rows[i] is None:
            rows[i] = tokenize_pair(tokenizer, p)
    if not rows:
        raise ValueError(f"{origin} holds no pairs")
    if max_length is not None:
        long = [i for i, (ids, _) in enumerate(rows) if len(ids) > max_length]
        if long and not drop_long:
            raise ValueError(f"{len(long)} of {len(rows)} pairs in {origin} are longer than {max_length} tokens (the "
                             f"first is line {long[0] + 1}, {len(rows[long[0]][0])} tokens): raise the length or drop them")
        rows = [r for r in rows if len(r[0]) <= max_length]
        if not rows:
            raise ValueError(f"every pair in {origin} is longer than {max_length} tokens")
    return PairDataset(rows, tokenizer.eos_token_id, tokenizer.pad_token_id, pad_with, multiple)


SPLIT_FILES = {"train": ("train.jsonl",), "val": ("validation.jsonl", "val.jsonl"), "test": ("test.jsonl",)}


def pair_split(source: str | Path, split: str) -> tuple[list[dict], str]:
    """(pairs, origin) of one split ("train", "val", "test") of a pair source: a folder holding `train.jsonl` and
    `validation.jsonl` (or `val.jsonl`) and `test.jsonl`, as `dlm.tasks` writes them; or a `.jsonl` file (or a
    folder with only `train.jsonl`), split here by a hash of each pair (5 % validation, 5 % test, as dlm splits a
    text source), so a pair's split does not depend on the order of the lines."""
    from dlm.data.corpus import Document, split_documents

    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLIT_FILES)}")
    path = Path(source).expanduser()
    if path.is_dir():
        for name in SPLIT_FILES[split]:
            if (path / name).is_file():
                return read_pairs(path / name), str(path / name)
        if not (path / "train.jsonl").is_file():
            raise FileNotFoundError(f"{path} holds no train.jsonl: a pair folder holds train.jsonl and "
                                    f"validation.jsonl (as python -m dlm.tasks.sudoku writes), or give a .jsonl file")
        others = [n for names in SPLIT_FILES.values() for n in names if n != "train.jsonl" and (path / n).is_file()]
        if others:  # split files written for this folder: a missing one is a mistake, not a reason to split train
            raise FileNotFoundError(f"{path} holds {others[0]} but no {' or '.join(SPLIT_FILES[split])} for the "
                                    f"{split} split")
        path = path / "train.jsonl"
    elif not path.is_file():
        raise FileNotFoundError(f"no such pair file or folder: {str(source)!r} (relative to {Path.cwd()})")
    pairs = read_pairs(path)
    keys = [json.dumps(p, sort_keys=True) for p in pairs]
    docs = [Document(str(i), "pair", str(i), k) for i, k in enumerate(keys)]
    chosen = {int(d.id) for d in split_documents(docs, 0.05, 0.05, lambda d: d.text)[split]}
    return [p for i, p in enumerate(pairs) if i in chosen], f"{path} ({split} split)"


class LengthBucketBatchSampler:
    """Batches of rows of similar length; batch k is a pure function of (seed, k, rank), so a resumed run sees
    the batches an uninterrupted one would (as dlm.train's StepBatchSampler).

    Epoch e walks a permutation of the rows seeded by (seed, e), drops its last N mod (batch_size * world) rows
    (other rows each epoch), cuts it into windows of `bucket` global batches, sorts each window by length, cuts
    the windows into global batches of batch_size * world rows and shuffles their order; this rank takes its slice.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, bucket: int = 50,
                 start: int | callable = 0, total: int | None = None, rank: int = 0, world: int = 1):
        self.lengths, self.batch_size, self.seed, self.bucket = list(lengths), batch_size, seed, bucket
        self.global_size = batch_size * world
        if len(self.lengths) < self.global_size:
            raise ValueError(f"{len(self.lengths)} pairs are fewer than one batch of {self.global_size}: "
                             f"use more data or a smaller batch size")
        self.per_epoch = len(self.lengths) // self.global_size
        self.start, self.total = start, self.per_epoch if total is None else total
        self.rank = rank
        self._plan: tuple[int, list[list[int]]] | None = None

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._plan is None or self._plan[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(len(self.lengths), generator=g)[: self.per_epoch * self.global_size].tolist()
            window = self.bucket * self.global_size
            batches = []
            for w in range(0, len(perm), window):
                rows = sorted(perm[w:w + window], key=lambda i: (self.lengths[i], i))
                batches += [rows[j:j + self.global_size] for j in range(0, len(rows), self.global_size)]
            order = torch.randperm(len(batches), generator=g).tolist()
            self._plan = (epoch, [batches[o] for o in order])
        return self._plan[1]

    def batch(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.per_epoch)
        rows = self._epoch(epoch)[j]
        return rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __iter__(self):
        start = self.start() if callable(self.start) else self.start
        for k in range(start, self.total):
            yield self.batch(k)

    def __len__(self) -> int:
        start = self.start() if callable(self.start) else self.start
        return max(self.total - start, 0)
