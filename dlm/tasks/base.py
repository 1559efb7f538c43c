"""The task contract: a seeded generator of examples with exact answers, a fixed tiny vocabulary, exact metrics.

An example is a dict of plain values (JSON-able); `format_prompt` / `format_response` turn it into strings of
the task's vocabulary (one character = one token), which the task's tokenizer maps to ids without BPE.
`write_pairs` writes `{split}.jsonl` files of `{"prompt", "response"}` lines and a `task.json`, the input of
supervised fine-tuning (`dlm.data.pairs`).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dlm.data.tokenizer import BOS_TOKEN, EOS_TOKEN, MASK_TOKEN, PAD_TOKEN

UNK_TOKEN = "[UNK]"
TASK_SPECIALS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, MASK_TOKEN, UNK_TOKEN]  # ids 0..4 of every task vocabulary
SPLITS = ("train", "validation", "test")

TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register a task under `cls.name` (unique)."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered")
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} is registered twice ({TASKS[cls.name].__name__} and {cls.__name__})")
    TASKS[cls.name] = cls
    return cls


def char_tokenizer(symbols: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with one token per character: ids 0..4 are [BOS] [EOS] [PAD] [MASK] [UNK], then
    `symbols` (single characters) in order. Any other character (a space too) encodes as [UNK]; decoding joins
    the tokens without spaces, so decode(encode(s)) == s for strings of `symbols`. Saved and loaded like any
    Hugging Face tokenizer (save_pretrained / dlm.data.load_tokenizer(folder))."""
    if any(len(s) != 1 for s in symbols) or len(set(symbols)) != len(symbols):
        raise ValueError(f"task symbols must be distinct single characters, got {symbols}")
    vocab = {tok: i for i, tok in enumerate(TASK_SPECIALS + list(symbols))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character its own token
    tok.decoder = decoders.Fuse()  # join without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN, unk_token=UNK_TOKEN, clean_up_tokenization_spaces=False,
    )


class Task:
    """A task with exact answers. Subclasses set `name` and `symbols` and implement the four methods below."""

    name: str = ""
    symbols: list[str] = []  # the task's characters, one token each (specials excluded)

    @property
    def vocabulary(self) -> list[str]:
        """Every token string in id order: the 5 specials, then the task's symbols."""
        return TASK_SPECIALS + list(self.symbols)

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The task's one-token-per-character tokenizer (see `char_tokenizer`)."""
        return char_tokenizer(self.symbols)

    def options(self) -> dict:
        """The options that rebuild this task with make_task(name, **options); written to task.json."""
        return {}

    def generate(self, split: str, n: int, seed: int) -> list[dict]:
        """`n` distinct examples of `split` (train / validation / test), a pure function of (split, n, seed);
        the three splits of one seed share no example."""
        raise NotImplementedError

    def format_prompt(self, example: dict) -> str:
        raise NotImplementedError

    def format_response(self, example: dict) -> str:
        raise NotImplementedError

    def score(self, example: dict, predicted: str) -> dict:
        """Exact metrics of a predicted response string for `example` (a dict of numbers)."""
        raise NotImplementedError

    def from_pair(self, prompt: str, response: str) -> dict:
        """The example a line of a pair file holds (the inverse of format_prompt / format_response), as
        `generate` would have made it."""
        raise NotImplementedError(f"task {self.name!r} cannot read its examples back from pair files")

    def from_prompt(self, prompt: str) -> dict:
        """An example from a prompt alone (a user's puzzle), its reference answer computed by the task; an error
        when the prompt is not one of the task's or has no unique answer."""
        raise NotImplementedError(f"task {self.name!r} cannot answer a prompt of its own")

    def show(self, example: dict, predicted: str) -> str:
        """The prompt and a predicted response, for printing."""
        return f"{self.format_prompt(example)}\n-> {predicted}"

    def response_text(self, ids: list[int], tokenizer) -> str:
        """A generated response (token ids after the prompt) as a string aligned one character per token: cut at
        the first EOS (what follows it is dropped, as in LLaDA), any other special token (a [MASK] left) as '?'."""
        tokens = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
        if tokenizer.eos_token in tokens:
            tokens = tokens[:tokens.index(tokenizer.eos_token)]
        return "".join(t if t in self.symbols else "?" for t in tokens)

    def score_ids(self, example: dict, ids: list[int], tokenizer) -> dict:
        """`score` of a generated response given as token ids (see `response_text`)."""
        return self.score(example, self.response_text(ids, tokenizer))

    def summarize(self, examples: list[dict], scores: list[dict]) -> dict:
        """The mean of each metric over the examples (a task may add more, e.g. the hardest examples alone)."""
        if not scores:
            return {}
        return {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}

    def write_pairs(self, folder: str | Path, sizes: dict[str, int], seed: int) -> Path:
        """Write `{split}.jsonl` ({"prompt", "response"} per line) for each split in `sizes` and `task.json`
        (name, options, seed, sizes, vocabulary, and `stats` of each split). Returns the folder."""
        bad = set(sizes) - set(SPLITS)
        if bad:
            raise ValueError(f"unknown split(s) {sorted(bad)}: use {', '.join(SPLITS)}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        examples = self.generate_splits(sizes, seed)
        stats = {}
        for split, exs in examples.items():
            with open(folder / f"{split}.jsonl", "w") as f:
                for ex in exs:
                    f.write(json.dumps({"prompt": self.format_prompt(ex), "response": self.format_response(ex)}) + "\n")
            stats[split] = self.stats(exs)
        meta = {"name": self.name, "options": self.options(), "seed": seed, "sizes": dict(sizes),
                "vocabulary": self.vocabulary, "stats": stats}
        (folder / "task.json").write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    def generate_splits(self, sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
        """Every split of `sizes` (the default calls `generate` per split)."""
        return {split: self.generate(split, n, seed) for split, n in sizes.items()}

    def stats(self, examples: list[dict]) -> dict:
        """Summary numbers of a list of examples for task.json (e.g. the givens achieved)."""
        return {"n": len(examples)}
