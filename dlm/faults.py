"""Named fault points for the reliability tests: `DLM_KILL_AT=<point>[:<n>]` makes the process SIGKILL itself the
n-th time (default 1) it reaches `<point>`, so a test can kill a run at an exact moment (e.g. right after a
checkpoint is renamed into place) instead of hoping a timer lands there. Unset (always, outside tests), each point
costs one dictionary lookup.

Points: checkpoint_renamed (after `os.replace` of any checkpoint), checkpoint_written (the temp file is complete,
before the rename), tokenizer_written (a tokenizer folder's files are written, before they are moved into place),
export_written (an export's files are in place, before its integrity record), log_row (a CSV row was flushed).

`DLM_KILL_SIGNAL=TERM` (or INT) sends that signal instead of SIGKILL: the process goes on, and the tests see what
`dlm train` does with a SIGTERM that lands at that exact moment (e.g. between a checkpoint's temp file and its rename).
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
    spec = os.environ.get("DLM_KILL_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("DLM_KILL_SIGNAL", "KILL")))
