"""Progress output: bars on a terminal, plain lines in a log file, a scheduler's or a CI's output.

A carriage-return bar written to a file is one endless "line" that `less`, `grep` and log viewers cannot read, so
every long-running command resolves a mode first (`trainer.progress=` for training, `--progress` elsewhere):

    auto   (or true) bars when stderr is a terminal; plain lines when it is not, or when NO_COLOR is set or TERM=dumb
    bar    always bars (tqdm, Lightning's bar)
    plain  always plain lines: one per interval, each a complete line, cut to the terminal's width
    off    (or false) no progress output (the commands' summaries and results are still printed)

Progress goes to stderr; stdout keeps only what a command produces (samples, the evaluation table).
Plain lines: training one every `trainer.progress_every` steps or every 30 s, whichever comes first (see
dlm/train/callbacks.py: PlainProgress); evaluation and sampling one per batch (sampling also within a long batch),
at most one every 10 s, and always the last one.
DLM_PROGRESS_SECONDS=S changes both intervals (0: a line for every batch or step).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time

MODES = ("auto", "bar", "plain", "off")
_ALIASES = {"true": "auto", "on": "auto", "yes": "auto", "false": "off", "no": "off", "none": "off"}
TRAIN_SECONDS = 30.0  # at most this long between two plain training lines
BATCH_SECONDS = 10.0  # at least this long between two plain lines of evaluation or sampling (the last one always)


def setting(value) -> str:
    """One of MODES from a config value, flag or argument: True is "auto" (show progress, in the form that suits
    stderr), False and None are "off"."""
    if value is None or isinstance(value, bool):
        return "auto" if value else "off"
    mode = _ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if mode not in MODES:
        raise ValueError(f"progress mode {value!r} is not one of {', '.join(MODES)} (or true = auto, false = off)")
    return mode


def resolve(value="auto", stream=None) -> str:
    """"bar", "plain" or "off": `value` (see setting), with "auto" decided by `stream` (default stderr)."""
    mode = setting(value)
    if mode != "auto":
        return mode
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return "plain"
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "plain"


def interval(default: float) -> float:
    """Seconds between plain lines: DLM_PROGRESS_SECONDS when set, else `default`."""
    value = os.environ.get("DLM_PROGRESS_SECONDS", "")
    try:
        return max(0.0, float(value)) if value.strip() else default
    except ValueError:
        raise ValueError(f"DLM_PROGRESS_SECONDS={value!r} must be a number of seconds (e.g. 30; 0: every line)"
                         ) from None


def width() -> int:
    """Columns a plain line may take: the terminal's (or $COLUMNS), 80 when there is no terminal."""
    return max(40, shutil.get_terminal_size((80, 24)).columns)


def fit(line: str) -> str:
    """`line` cut to width() columns ("..." marks a cut)."""
    w = width()
    return line if len(line) <= w else line[: w - 3] + "..."


def emit(line: str, stream=None) -> None:
    """Print one plain progress line to stderr (a whole line, flushed at once)."""
    stream = sys.stderr if stream is None else stream
    print(fit(line), file=stream, flush=True)


def duration(seconds: float) -> str:
    """A short clock: 42s, 3m05s, 1h02m."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Lines:
    """Plain progress of `total` items (batches): `update()` after each one prints "desc 3/8 | 12s" when
    at least `every` seconds have passed since the last line, and always for the last item."""

    def __init__(self, desc: str, total: int, every: float | None = None, stream=None):
        self.desc, self.total, self.stream = desc, total, stream
        self.every = interval(BATCH_SECONDS) if every is None else every
        self.done = 0
        self.start = self.last = time.perf_counter()

    def due(self) -> bool:
        return time.perf_counter() - self.last >= self.every

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done >= self.total or self.due():
            self.line(f"{self.done}/{self.total}")

    def line(self, text: str) -> None:
        now = time.perf_counter()
        emit(f"{self.desc} {text} | {duration(now - self.start)}", self.stream)
        self.last = now


def track(items, desc: str, mode="auto", unit: str = "batch"):
    """`items` (a sized iterable) with progress: a tqdm bar, plain lines (Lines) or nothing, by resolve(mode)."""
    mode = resolve(mode)
    if mode == "off":
        return items
    if mode == "bar":
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit=unit)
    return _plain(items, Lines(f"{desc}: {unit}", len(items)))


def _plain(items, lines: Lines):
    for item in items:
        yield item
        lines.update()


class StepLines(Lines):
    """Plain progress of sampling, a per-step callback (`Sampler.sample(..., callback=)`), and `end_batch()` after
    each batch. A line within a batch ("sampling: batch 2/4 | step 37 | 12s") and after it ("sampling: batch 2/4
    done | 128 steps | 20s") when `every` seconds have passed since the last line; after the last batch always."""

    def __init__(self, batches: int, desc: str = "sampling", every: float | None = None, stream=None):
        super().__init__(f"{desc}: batch", batches, every, stream)
        self.steps = 0  # step events of the current batch

    def __call__(self, event) -> None:
        self.steps += 1
        if self.due():
            self.line(f"{self.done + 1}/{self.total} | step {self.steps}")

    def end_batch(self) -> None:
        steps, self.steps = self.steps, 0
        self.done += 1
        if self.done >= self.total or self.due():
            self.line(f"{self.done}/{self.total} done | {steps} steps")


@contextlib.contextmanager
def other_bars_off(mode="auto"):
    """Within the block, tqdm bars that other libraries draw (transformers' GGUF de-quantization and weight
    loading, Hugging Face downloads) are off unless resolve(mode) is "bar": dlm's plain lines do not use tqdm."""
    if resolve(mode) == "bar":
        yield
        return
    from tqdm import std

    init = std.tqdm.__init__

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    std.tqdm.__init__ = quiet_init
    try:
        yield
    finally:
        std.tqdm.__init__ = init
