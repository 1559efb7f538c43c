"""Training data for Lightning: tokenised rows, and a batch order that depends only on the step number.

Batch k of the run is a pure function of (seed, k, rank), so a resumed run sees exactly the batches an
uninterrupted run would, without saving any iterator state: the sampler restarts at `global_step * accumulate`.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from dlm.config import RunConfig
from dlm.data.batch import make_batch


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


class TextDataModule(L.LightningDataModule):
    """Builds the tokenizer (or reuses the run's) and the tokenised train/validation rows."""

    def __init__(self, cfg: RunConfig, tokenizer):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.train_rows = self.val_rows = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is not None:
            return
        self.train_rows = load_rows(self.cfg, self.tokenizer, "train")
        self.val_rows = load_rows(self.cfg, self.tokenizer, "val")

    def train_dataloader(self) -> DataLoader:
        t = self.cfg.trainer
        trainer = self.trainer
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
        n = min(len(self.val_rows), t.val_batches * t.batch_size)
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
    train_texts = load_texts(cfg.data.source, split="train", text_field=cfg.data.text_field) if cfg.data.tokenizer == "bpe" else None
    tok = load_tokenizer(cfg.data.tokenizer, train_texts=train_texts, vocab_size=cfg.data.vocab_size)
    if saved is not None:
        from dlm.integrity import save_tokenizer_dir

        save_tokenizer_dir(tok, saved)
    return tok


def _legacy_tokenizer_dir(folder: Path) -> bool:
    """A run's tokenizer/ written before integrity records: a complete save has tokenizer_config.json (the last file
    transformers writes). Such a folder is still read; the resume checks it against the checkpoint's fingerprint."""
    return (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
