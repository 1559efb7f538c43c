"""Training data for Lightning: tokenised rows, and a batch order that depends only on the step number.

Batch k of the run is a pure function of (seed, k, rank), so a resumed run sees exactly the batches an
uninterrupted run would, without saving any iterator state: the sampler restarts at `global_step * accumulate`.

Two formats (`data.format`): "text", documents packed into rows of model.context tokens; "pairs", prompt ->
response pairs for supervised fine-tuning (dlm.data.pairs): one pair per row, no packing, rows of similar length
batched together (`LengthBucketBatchSampler`, also a pure function of (seed, k, rank)), the prompt `given` (never
noised, never scored: the process contract), the response right-padded with EOS inside the loss.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from dlm.config import ConfigError, RunConfig
from dlm.data.batch import make_batch
from dlm.data.pairs import LengthBucketBatchSampler, PairDataset, pair_split, tokenize_pairs


class TokenRows(Dataset):
    """Rows of token ids (N, L) and, for padded packing, an attention mask (N, L)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        self.input_ids, self.attention_mask = input_ids, attention_mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"row": torch.tensor(i)}

    def collate(self, items: list[dict]) -> dict:
        """Index the rows in one vectorised gather (faster than stacking per-row tensors)."""
        idx = torch.stack([it["row"] for it in items])
        return make_batch(self.input_ids[idx].long(), None if self.attention_mask is None else self.attention_mask[idx])



class StepBatchSampler:
    """Yields lists of row indices for micro-batches start, start+1, ... of this rank.

    The global stream walks a fresh permutation of the rows per epoch (seeded by (seed, epoch)); micro-batch k
    takes `batch_size * world` consecutive entries, and this rank takes its slice of them.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, start: callable, total: int,
                 rank: int = 0, world: int = 1):
        if num_rows < batch_size * world:
            raise ValueError(f"the training split has {num_rows} rows, fewer than one global batch "
                             f"({batch_size} x {world} devices); use more data or a smaller trainer.batch_size")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.start, self.total, self.rank, self.world = start, total, rank, world
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))}
        return self._perms[epoch]

    def batch(self, k: int) -> list[int]:
        first = (k * self.world + self.rank) * self.batch_size
        out = []
        for pos in range(first, first + self.batch_size):
            epoch, i = divmod(pos, self.num_rows)
            out.append(int(self._perm(epoch)[i]))
        return out

    def __iter__(self):
        for k in range(self.start(), self.total):
            yield self.batch(k)

    def __len__(self) -> int:
        return self.total


class PairStepSampler(LengthBucketBatchSampler):
    """The length-bucketed batches k = start, start+1, ... (start read when iteration (re)starts, e.g. on resume);
    its length is the run's total, as StepBatchSampler's."""

    def __len__(self) -> int:
        return self.total


class TextDataModule(L.LightningDataModule):
    """Builds the tokenizer (or reuses the run's) and the tokenised train/validation rows (packed text, or pairs
    with data.format=pairs)."""

    def __init__(self, cfg: RunConfig, tokenizer):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.train_rows = self.val_rows = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is not None:
            return
        load = load_pair_rows if self.cfg.data.format == "pairs" else load_rows
        self.train_rows = load(self.cfg, self.tokenizer, "train")
        self.val_rows = load(self.cfg, self.tokenizer, "val") if self.cfg.trainer.val_batches > 0 else None

    def train_dataloader(self) -> DataLoader:
        t = self.cfg.trainer
        trainer = self.trainer
        if isinstance(self.train_rows, PairDataset):
            sampler = PairStepSampler(self.train_rows.lengths, t.batch_size, t.seed,
                                      start=lambda: trainer.global_step * t.accumulate, total=t.max_steps * t.accumulate,
                                      rank=trainer.global_rank, world=trainer.world_size)
            return DataLoader(self.train_rows, batch_sampler=sampler, collate_fn=self.train_rows.collate,
                              num_workers=self.cfg.data.num_workers)
        sampler = StepBatchSampler(
            len(self.train_rows), t.batch_size, t.seed,
            start=lambda: trainer.global_step * t.accumulate,  # read when iteration (re)starts, e.g. on resume
            total=t.max_steps * t.accumulate,
            rank=trainer.global_rank, world=trainer.world_size,
        )
        return DataLoader(self.train_rows, batch_sampler=sampler, collate_fn=self.train_rows.collate,
                          num_workers=self.cfg.data.num_workers)

    def val_dataloader(self) -> DataLoader:
        t = self.cfg.trainer
        if self.val_rows is None:  # trainer.val_batches=0: no validation split is read
            return DataLoader([], batch_size=1)
        n = min(len(self.val_rows), t.val_batches * t.batch_size)
        if isinstance(self.val_rows, PairDataset):  # the first n pairs, in batches of similar length
            rows = sorted(range(n), key=lambda i: (self.val_rows.lengths[i], i))
            return DataLoader(rows, batch_size=t.batch_size, shuffle=False, collate_fn=self.val_rows.collate)
        subset = TokenRows(self.val_rows.input_ids[:n], None if self.val_rows.attention_mask is None
                           else self.val_rows.attention_mask[:n])
        return DataLoader(subset, batch_size=t.batch_size, shuffle=False, collate_fn=subset.collate)


def load_rows(cfg: RunConfig, tokenizer, split: str) -> TokenRows:
    """Tokenised, packed rows of one split (cached on disk by dlm.data)."""
    from dlm.data.corpus import load_texts
    from dlm.data.packing import build_token_dataset

    texts = load_texts(cfg.data.source, split=split, text_field=cfg.data.text_field)
    data = build_token_dataset(texts, tokenizer, cfg.model.context, packing=cfg.data.packing,
                               cache_dir=cfg.data.cache_dir or None)
    return TokenRows(data["input_ids"], data.get("attention_mask"))


def load_pair_rows(cfg: RunConfig, tokenizer, split: str) -> PairDataset:
    """Tokenised pairs of one split (dlm.data.pairs.pair_split), each at most model.context tokens; a batch is
    padded to a multiple of the block size for a block-diffusion process."""
    pairs, origin = pair_split(cfg.data.source, split)
    block = getattr(cfg.process, "block_size", 0) or 1
    try:
        return tokenize_pairs(pairs, tokenizer, cfg.model.context, origin=origin, multiple=block)
    except ValueError as e:
        if "longer than" not in str(e):
            raise
        raise ConfigError(f"{e} (the length is model.context={cfg.model.context}: set model.context to at least "
                          "the longest pair; pairs are never truncated)") from e


def validation_batches(cfg: RunConfig, tokenizer) -> list[dict]:
    """The first trainer.val_batches validation batches, as validation sees them (text or pairs)."""
    t = cfg.trainer
    if cfg.data.format == "pairs":
        rows = load_pair_rows(cfg, tokenizer, "val")
        n = min(len(rows), t.val_batches * t.batch_size)
        order = sorted(range(n), key=lambda i: (rows.lengths[i], i))
        return [rows.collate(order[i:i + t.batch_size]) for i in range(0, n, t.batch_size)]
    rows = load_rows(cfg, tokenizer, "val")
    batches = []
    for start in range(0, min(len(rows), t.val_batches * t.batch_size), t.batch_size):
        am = None if rows.attention_mask is None else rows.attention_mask[start:start + t.batch_size]
        batches.append(make_batch(rows.input_ids[start:start + t.batch_size].long(), am))
    return batches


def pair_texts(cfg: RunConfig) -> list[str]:
    """The training pairs' text (prompts, responses, turns), what a "bpe" tokenizer of a pair run is trained on."""
    pairs, _ = pair_split(cfg.data.source, "train")
    texts = []
    for p in pairs:
        texts += [m.get("content", "") for m in p["messages"]] if "messages" in p else [p["prompt"], p["response"]]
    return [t for t in texts if t]


def resolve_data(cfg: RunConfig) -> None:
    """A pair folder written by a task (its task.json) trains with the task's tokenizer: data.tokenizer=bpe (the
    default) becomes "task" there, recorded in the run's config (a started run, or init_from, keeps its own)."""
    from dlm.tasks import task_of_folder

    if (cfg.data.format == "pairs" and cfg.data.tokenizer == "bpe" and not cfg.init_from
            and Path(cfg.data.source).expanduser().is_dir() and task_of_folder(cfg.data.source) is not None):
        cfg.data.tokenizer = "task"


def task_tokenizer(source: str):
    """data.tokenizer=task: the tokenizer of the task that wrote the pair folder `source` (its task.json)."""
    from dlm.tasks import task_of_folder

    task = task_of_folder(source) if Path(source).expanduser().is_dir() else None
    if task is None:
        raise ConfigError(f"data.tokenizer=task needs a pair folder written by a task (with a task.json, e.g. python "
                          f"-m dlm.tasks.sudoku --out FOLDER); data.source={source!r} has none")
    return task.tokenizer()


def build_tokenizer(cfg: RunConfig, run_dir: Path | None):
    """The run's tokenizer: reused from `run_dir/tokenizer` when the run already has one (resume), else built."""
    from dlm.data.corpus import load_texts
    from dlm.data.tokenizer import load_tokenizer

    saved = run_dir / "tokenizer" if run_dir is not None else None
    if saved is not None and saved.is_dir():  # written whole with its integrity record (dlm.integrity)
        from dlm.integrity import RECORD, load_tokenizer_dir

        fix = (f"delete {saved} and run the same command again (it is restored from the run's checkpoint, or "
               "rebuilt if the run has none yet)")
        return load_tokenizer_dir(saved, fix, verify=(saved / RECORD).exists() or not _legacy_tokenizer_dir(saved))
    if cfg.data.tokenizer == "task":
        tok = task_tokenizer(cfg.data.source)
    else:
        train_texts = None
        if cfg.data.tokenizer == "bpe":
            train_texts = (pair_texts(cfg) if cfg.data.format == "pairs"
                           else load_texts(cfg.data.source, split="train", text_field=cfg.data.text_field))
        tok = load_tokenizer(cfg.data.tokenizer, train_texts=train_texts, vocab_size=cfg.data.vocab_size)
    if saved is not None:
        from dlm.integrity import save_tokenizer_dir

        save_tokenizer_dir(tok, saved)
    return tok


def _legacy_tokenizer_dir(folder: Path) -> bool:
    """A run's tokenizer/ written before integrity records: a complete save has tokenizer_config.json (the last file
    transformers writes). Such a folder is still read; the resume checks it against the checkpoint's fingerprint."""
    return (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
