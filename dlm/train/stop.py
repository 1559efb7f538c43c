"""SIGTERM and SIGINT during `dlm train`: stop at the next optimizer-step boundary with a checkpoint, not at once.

What a scheduler, `timeout` or Ctrl-C sends, and what dlm does (docs/reliability.md):
- the first SIGTERM or SIGINT is recorded; the step in progress finishes (every micro-batch of its accumulation
  window and the optimizer step), `StepCheckpoint` (dlm/train/durable.py) writes last.ckpt for that step (the same
  atomic file a resume reads; none is written when the step is already saved), and `RunStopped` ends the run: the
  lock is released and the CLI prints one line and exits with 128 + the signal's number (143, 130);
- before training starts (setup, tokenizer, data) nothing needs saving: the first signal raises `RunStopped` at once
  (every file written there is written atomically);
- further signals while the run stops are ignored, so a second Ctrl-C or SIGTERM never cuts a checkpoint write
  (which is a temp file + rename anyway: the previous last.ckpt stays whole until the rename); `kill -9` stops at once;
- a signal during the export that follows the last step lets it finish: the run is complete (exit 0, with a note).
  Once `dlm train` has decided its exit status, the process ignores SIGTERM and SIGINT (dlm/cli.py): Python puts
  the default action back while it shuts down, and a signal landing then would make a finished run look killed.

Lightning installs its own SIGTERM handler when `fit` starts (it would end the run after any micro-batch, inside an
accumulation window, and `fit` would return as if done): `StopSignals.take_back()` puts dlm's back in place when
training starts, so the behaviour is the same whatever Lightning does.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(BaseException):
    """A run stopped by a signal (a BaseException, like KeyboardInterrupt: no `except Exception` swallows it)."""

    def __init__(self, signum: int, step: int | None = None, max_steps: int | None = None):
        self.signum, self.step, self.max_steps = signum, step, max_steps
        super().__init__(self.message())

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # as a shell reports a process ended by the signal: 143 SIGTERM, 130 SIGINT

    def message(self) -> str:
        where = "before training started" if self.step is None else f"at step {self.step} of {self.max_steps}"
        return f"dlm: stopped by {self.name} {where}; resume with the same command"


class StopSignals:
    """Context manager: dlm's SIGTERM and SIGINT handlers for the duration of a run (main thread only; elsewhere,
    e.g. a run started from a thread, nothing is installed and signals keep their handlers)."""

    def __init__(self):
        self.signum: int | None = None  # the first signal received
        self.in_training = False  # True (from training's start): record, stop at the next step boundary; False: raise
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # stopping already: a second signal must not cut the checkpoint write
            return
        self.signum = signum
        if not self.in_training:
            raise RunStopped(signum)

    def take_back(self) -> None:
        """(Re)install the handlers: at the start, and again when training starts, after Lightning's own."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s in SIGNALS:
            previous = signal.signal(s, self._handle)
            self._previous.setdefault(s, previous)

    def __enter__(self) -> "StopSignals":
        self.take_back()
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
