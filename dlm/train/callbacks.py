"""Small Lightning callbacks: throughput in the progress bar, plain progress lines for logs, the loss-curve plot,
the step timer (checkpoints: dlm/train/durable.py)."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Timer, TQDMProgressBar

from dlm.progress import TRAIN_SECONDS, duration, emit, interval


class Throughput(L.Callback):
    """Logs tokens per second (all devices) to the progress bar and the logs."""

    def __init__(self):
        self._t0 = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        now = time.perf_counter()
        tokens = batch["input_ids"].numel() * trainer.world_size
        module.log("train/tokens_per_s", tokens / max(now - self._t0, 1e-9), prog_bar=True, on_step=True, on_epoch=False)
        self._t0 = now

    def on_validation_end(self, trainer, module):
        self._t0 = None  # do not count validation time as training time


class StepTimer(Timer):
    """Lightning's Timer (training time kept in the checkpoint and summed over resumes; with a duration, a time
    budget) that looks at the clock only after an optimizer step. Lightning's own checks after every micro-batch,
    so with gradient accumulation it could stop inside an accumulation window, and the run would then resume
    out of step with the uninterrupted one."""

    def __init__(self, duration=None):
        super().__init__(duration=duration, interval="step")
        self._step_seen = None

    @property
    def state_key(self) -> str:
        return "Timer"  # the checkpoint key of Lightning's Timer, so earlier runs keep their time

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._step_seen = trainer.global_step

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step == self._step_seen:  # inside an accumulation window: no optimizer step yet
            return
        self._step_seen = trainer.global_step
        super().on_train_batch_end(trainer, *args, **kwargs)


class ProgressBar(TQDMProgressBar):
    """Lightning's bar without the logger's version number (`v_num`), which means nothing in a dlm run."""

    def get_metrics(self, trainer, module):
        items = super().get_metrics(trainer, module)
        items.pop("v_num", None)
        return items


class PlainProgress(L.Callback):
    """Progress as whole lines on stderr, for logs (trainer.progress=plain, or auto off a terminal): one line every
    `every` optimizer steps or `seconds` seconds, whichever comes first, and at the last step:

        train step 150/1200 | loss 5.123 | 2,345 tok/s | 1m05s | ETA 7m20s

    loss: the mean over the steps since the previous line; tok/s: training tokens (all devices) over that wall
    time, validation excluded; then the time since this invocation started training, and the time left at the
    current pace (capped by trainer.max_minutes' budget when one is set: "(budget)"; none on the line of a run
    stopped before its last step). After each validation, its metrics and time:

        val   step 250/1200 | ppl 312.40 | nll 5.744 | 3s
    """

    def __init__(self, every: int, seconds: float | None = None):
        self.every, self.seconds = every, interval(TRAIN_SECONDS) if seconds is None else seconds
        self._step = self._printed = -1
        self._losses, self._tokens, self._paused = [], 0, 0.0  # _paused: validation seconds since the last line

    def on_train_start(self, trainer, module):
        self._start = self._last = time.perf_counter()
        self._first = self._step = self._printed = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._tokens += batch["input_ids"].numel() * trainer.world_size
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self._losses.append(float(loss))
        if trainer.global_step == self._step:  # inside an accumulation window
            return
        self._step = trainer.global_step
        now = time.perf_counter()
        if self._step % self.every == 0 or now - self._last >= self.seconds or self._step >= trainer.max_steps:
            self._line(trainer, now)

    def on_train_end(self, trainer, module):
        if trainer.global_step != self._printed:  # stopped between two lines (time budget, interrupt)
            self._line(trainer, time.perf_counter(), final=True)

    def _line(self, trainer, now: float, final: bool = False) -> None:
        if not trainer.is_global_zero:
            return
        step, total = trainer.global_step, trainer.max_steps
        parts = [f"train step {step}/{total}"]
        if self._losses:
            parts.append(f"loss {sum(self._losses) / len(self._losses):.3f}")
        parts.append(f"{self._tokens / max(now - self._last - self._paused, 1e-9):,.0f} tok/s")
        parts.append(duration(now - self._start))
        left = None
        if step > self._first and step < total and not final:
            left = (now - self._start) / (step - self._first) * (total - step)
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        budget = timer.time_remaining("train") if timer is not None else None
        if budget is not None and step < total and not final and (left is None or budget < left):
            left = budget  # trainer.max_minutes stops the run first
            parts.append(f"ETA {duration(left)} (budget)")
        elif left is not None:
            parts.append(f"ETA {duration(left)}")
        emit(" | ".join(parts))
        self._last, self._printed, self._losses, self._tokens, self._paused = now, step, [], 0, 0.0

    def on_validation_start(self, trainer, module):
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        parts = [f"val   step {trainer.global_step}/{trainer.max_steps}"]
        parts += [f"{k} {float(m[f'val/{k}']):{fmt}}" for k, fmt in (("ppl", ".2f"), ("nll", ".3f")) if f"val/{k}" in m]
        parts.append(duration(time.perf_counter() - self._val_start))
        emit(" | ".join(parts))
        self._paused += time.perf_counter() - self._val_start  # validation time is not training throughput


class LossCurvePlot(L.Callback):
    """Redraws `loss_curve.png` (training loss and validation perplexity against step) after each validation."""

    def __init__(self, log_dir: Path, out_path: Path, likelihood: str = "bound"):
        self.log_dir, self.out_path, self.likelihood = log_dir, out_path, likelihood

    def on_validation_end(self, trainer, module):
        if trainer.is_global_zero and not trainer.sanity_checking:
            trainer.logger.save()
            plot_loss_curve(self.log_dir, self.out_path, self.likelihood)

    def on_train_end(self, trainer, module):
        self.on_validation_end(trainer, module)


def read_metrics(log_dir: Path) -> dict[str, dict[int, float]]:
    """metric -> {step: value} from the CSV logs; a step logged twice (a resumed run) keeps its last value."""
    series: dict[str, dict[int, float]] = {}
    for path in sorted(Path(log_dir).glob("**/metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                step = int(float(row["step"]))
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in ("", None):
                        series.setdefault(key, {})[step] = float(value)
    return series


def plot_loss_curve(log_dir: Path, out_path: Path, likelihood: str = "bound") -> Path | None:
    """likelihood: what the validation perplexity is (the process's `likelihood`: bound, exact, estimate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(log_dir)
    if "train/loss" not in series:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps, losses = zip(*sorted(series["train/loss"].items()))
    ax1.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
    k = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1]) for i in range(len(losses))]
    ax1.plot(steps, smooth, lw=1.5, label=f"mean of {k + 1} steps")
    ax1.set(xlabel="step", ylabel="training loss (nats/token)", title="training loss")
    ax1.legend()
    if "val/ppl" in series:
        vs, vp = zip(*sorted(series["val/ppl"].items()))
        ax2.plot(vs, vp, marker="o")
        ax2.set_yscale("log")
    ax2.set(xlabel="step", ylabel=f"perplexity ({likelihood})", title="validation perplexity (EMA weights)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
