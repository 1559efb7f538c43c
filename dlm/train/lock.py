"""One writer per run folder: `dlm train` holds `<out_dir>/.lock` (an exclusive `flock`, with the holder's pid,
host and start time inside) for as long as it runs. A second `dlm train` on the same folder gets a clear error;
a lock left by a process that no longer exists (killed) is taken over with a message.

The kernel releases a `flock` when its holder dies, even by SIGKILL, so "stale" never needs a guess on one
machine; across machines (a network file system) the pid and host in the file say who holds it."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from dlm.config import ConfigError


class RunLocked(ConfigError):
    """Another process is writing this run folder."""


def _is_primary_process() -> bool:
    """False in the extra processes of a multi-process run (DDP ranks > 0, nodes > 0), which share rank 0's lock."""
    for var in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if not _is_primary_process():
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLocked(
                    f"{self.path.parent} is in use by another dlm train (pid {holder.get('pid', '?')} on host "
                    f"{holder.get('host', '?')}, since {holder.get('started', '?')}; lock file {self.path}): wait for "
                    "it to finish, or stop it, or use another trainer.out_dir") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file the previous holder unlinked while we opened it
                break
            os.close(fd)
        previous = _read_holder(fd)
        if previous.get("pid"):
            here = previous.get("host") == socket.gethostname()
            print(f"dlm: taking over the lock of {self.path.parent} left by pid {previous['pid']} on host "
                  f"{previous.get('host', '?')}" + (" (no longer running)" if here else "")
                  + f"; lock file {self.path}", flush=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it, so nobody locks the unlinked file
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(data) if data else {}
    except (OSError, ValueError):
        return {}
