"""Peak memory of a piece of work (sampling, a benchmark), reported beside NFE and wall time (SPEC section 5).

    with PeakMemory(device) as mem:
        ...
    mem.mib  # float, or None where it cannot be measured

What is measured depends on the device:
  cuda  the peak of the memory PyTorch's allocator held during the block (`torch.cuda.max_memory_allocated`,
        reset at entry): tensors only, the figure that decides whether a batch fits on the GPU;
  cpu   on Linux, the peak resident set of the whole process during the block (VmHWM in /proc/self/status,
        reset at entry through /proc/self/clear_refs): weights, activations, caches and the Python runtime,
        the figure that decides whether the job fits in RAM. Memory the process already held before the block
        counts too (`import dlm` keeps freed memory for reuse, see dlm/allocator.py), so it is an upper bound
        on what the block itself needed;
  other None.
Blocks may nest: only the outermost resets the peak, so an outer block's figure is never lowered by an inner one.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
_depth = 0  # how many PeakMemory blocks are open


def _resident_peak_kib() -> int | None:
    """VmHWM, the process's peak resident set in KiB, or None where /proc does not have it."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_resident_peak() -> bool:
    """Set VmHWM to the current resident size (Linux >= 4.0); False where that is not allowed."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: `mib` = the peak memory in MiB during the block (see the module docstring), or None."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.mib: float | None = None
        self._ok = False

    def __enter__(self) -> "PeakMemory":
        global _depth
        outermost = _depth == 0
        _depth += 1
        if self.device.type == "cuda":
            if outermost:
                torch.cuda.reset_peak_memory_stats(self.device)
            self._ok = True
        elif self.device.type == "cpu" and sys.platform.startswith("linux"):
            self._ok = (_reset_resident_peak() if outermost else True) and _resident_peak_kib() is not None
        return self

    def __exit__(self, *exc) -> None:
        global _depth
        _depth -= 1
        if not self._ok:
            return
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = _resident_peak_kib()
            self.mib = None if peak is None else peak / 1024
