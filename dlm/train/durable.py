"""What makes a run survive `kill -9` at any moment and resume exactly:

- `StepCheckpoint` writes `last.ckpt` every `trainer.ckpt_every` optimizer steps, and only at an optimizer-step
  boundary: never inside a gradient-accumulation window, never again for the step a resumed run started from, and,
  at a step that is also validated, only after the validation (so `best.ckpt` and the validation row are never
  behind the checkpoint a resume starts from). The final state is saved too (at a validated last step right after
  its validation, else at the end of training). Before each save the CSV rows of every step up to it are on disk.
- `DurableCSVLogger`: Lightning's CSV logger whose header rewrite is atomic and which ignores the second copy of a
  row (the checkpoint writes a step's row before Lightning would, so that it is on disk before the checkpoint).
- `truncate_logs`: on resume from step k, rows of steps >= k (logged after that checkpoint by the run that was
  killed, and about to be logged again) and any half-written row are removed, so every step appears once.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class StepCheckpoint(Checkpoint):
    """`last.ckpt` every `every` optimizer steps (see the module's docstring) and at the end of training."""

    def __init__(self, path: Path, every: int, stop=None):
        self.path, self.every = Path(path), every
        self.stop = stop  # a StopSignals (dlm/train/stop.py): after a SIGTERM/SIGINT, save this step and stop
        self._seen = self._saved = -1
        self._pending = False

    @property
    def state_key(self) -> str:
        return "StepCheckpoint"

    def on_train_start(self, trainer, module) -> None:
        self._seen = self._saved = trainer.global_step  # a resumed run's first step is already on disk
        self._pending = False
        if self.stop is not None:  # from now on a signal stops at the next optimizer-step boundary
            self.stop.in_training = True
            self.stop.take_back()  # over the SIGTERM handler Lightning installed when fit started

    def _stop_requested(self, trainer) -> bool:
        """A signal was received (on any process of a multi-process run: all stop at the same step)."""
        requested = self.stop is not None and self.stop.requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        return requested

    def _stopped(self, trainer):
        from dlm.train.stop import RunStopped

        signum = self.stop.signum if self.stop is not None and self.stop.requested else 15  # 15: another rank's
        return RunStopped(signum, trainer.global_step, trainer.max_steps)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._seen:  # inside an accumulation window: no optimizer step yet
            return
        self._seen = step
        stop = self._stop_requested(trainer)
        if stop and step == self._saved:
            raise self._stopped(trainer)
        if (step % self.every and not stop) or step == self._saved:
            return
        loop = trainer.fit_loop
        if loop.epoch_loop._should_check_val_fx(loop._data_fetcher):  # Lightning validates after this batch
            self._pending = True  # (a stop too waits for it: saved, then stopped, in on_validation_end)
            return
        if trainer.loggers and all(isinstance(lg, DurableCSVLogger) for lg in trainer.loggers):
            # The row of this step is logged after this hook; log it now (the logger drops the second copy).
            trainer._logger_connector.update_train_step_metrics()
        self._save(trainer)
        if stop or self._stop_requested(trainer):  # (also a signal received during this save)
            raise self._stopped(trainer)

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking:
            return
        if self._pending:
            self._pending = False
            self._save(trainer, "validation_end")
            if self._stop_requested(trainer):
                raise self._stopped(trainer)

    def on_train_end(self, trainer, module) -> None:
        if trainer.global_step != self._saved:  # the final state (max_steps, a time budget)
            self._save(trainer, "train_end")

    def _save(self, trainer, stage: str = "train_batch_end") -> None:
        for logger in trainer.loggers:
            logger.save()
        self._stage = stage
        try:
            trainer.save_checkpoint(self.path, weights_only=False)  # full state (optimizer, loops) for resuming
        finally:
            self._stage = None
        self._saved = trainer.global_step

    _stage = None

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        """Every last.ckpt is written in the shape of a save at the end of a training batch, the one point from which
        Lightning resumes its loop counters unambiguously: after a validation (or at the end of training) the batch
        is already counted as completed (and, at the end, the logger's step advanced), and Lightning's resume would
        then, depending on whether the step is a validation step, count it once more or not at all in the step
        numbers of the logs. The validation itself is not run again: it precedes the save."""
        if self._stage in ("validation_end", "train_end"):
            fit = checkpoint["loops"]["fit_loop"]
            for which in ("total", "current"):
                fit["epoch_loop.batch_progress"][which]["completed"] -= 1
            if self._stage == "train_end":
                fit["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1


class _DurableWriter(ExperimentWriter):
    def save(self) -> None:
        """Lightning's save, whose full disk (met when the buffered rows are flushed: an OSError without a file
        name) names the metrics file."""
        try:
            super().save()
        except OSError as e:
            if e.filename:
                raise
            raise OSError(e.errno, e.strerror, str(self.metrics_file_path)) from e

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        """Lightning rewrites the file in place when a new column appears; here through a temp file + rename."""
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        _write_atomic(Path(self.metrics_file_path), fieldnames, rows)


class DurableCSVLogger(CSVLogger):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_row = None

    @property
    @rank_zero_experiment
    def experiment(self) -> _DurableWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _DurableWriter(log_dir=self.log_dir)
        return self._experiment

    def log_metrics(self, metrics, step=None) -> None:
        row = (step, sorted((k, float(v)) for k, v in metrics.items()))
        if row == self._last_row:  # the same row again (StepCheckpoint logged it ahead of Lightning)
            return
        self._last_row = row
        super().log_metrics(metrics, step)


def _write_atomic(path: Path, fieldnames: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue(), newline="")
    os.replace(tmp, path)


def truncate_logs(log_dir: Path, step: int) -> int:
    """Drop the rows of steps >= `step` and any half-written last row from every metrics.csv under `log_dir`
    (atomically); returns how many rows were dropped."""
    dropped = 0
    for path in sorted(Path(log_dir).glob("*/metrics.csv")):
        text = path.read_text()
        complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]  # a row cut by a kill
        reader = csv.DictReader(io.StringIO(complete))
        fields = list(reader.fieldnames or [])
        rows, keep = list(reader), []
        for row in rows:
            try:
                if int(float(row["step"])) < step:
                    keep.append(row)
            except (KeyError, TypeError, ValueError):
                pass
        removed = len(rows) - len(keep) + (complete != text)
        if removed and fields:
            _write_atomic(path, fields, keep)
        dropped += removed
    return dropped
