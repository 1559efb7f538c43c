"""Checks that turn would-be tracebacks and silent garbage into one clear line: writes to full or read-only disks,
devices that are not there, sampling arguments that cannot mean anything."""

from __future__ import annotations

import errno
import math
import shutil
from pathlib import Path

import torch

# errno -> (what happened, what to do)
_WRITE_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free space on that disk or write to another one"),
    errno.EDQUOT: ("disk quota exceeded", "free space within the quota or write to another disk"),
    errno.EROFS: ("read-only file system", "write to a writable folder"),
    errno.EACCES: ("permission denied", "write to a folder you may write to"),
    errno.EPERM: ("operation not permitted", "write to a folder you may write to"),
}


def is_disk_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _WRITE_ERRORS


def disk_error_message(e: OSError, path: str | Path | None = None, hint: str = "") -> str:
    """"cannot write PATH: read-only file system; write to a writable folder (HINT)"."""
    what, fix = _WRITE_ERRORS.get(e.errno, (e.strerror or str(e), "check the disk"))
    where = path or e.filename or "a file"
    return f"cannot write {where}: {what}; {fix}" + (f" ({hint})" if hint else "")


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) checkpoint: about its size on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def human_size(n: int) -> str:
    """Bytes as "340 KB", "2.2 MB" or "12.5 GB" (never "0 MB" for a few hundred KB)."""
    for unit, size in (("GB", 2**30), ("MB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{math.ceil(n / 2**10)} KB"


def no_space_message(path: Path, needed: int, what: str = "an atomic checkpoint") -> str:
    free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
    return (f"no space left on device: need ~{human_size(needed)} free for {what} ({path}; {human_size(free)} free "
            "there); free space on that disk or set trainer.out_dir to another one")


def check_text(option: str, text: str | None) -> None:
    """A ValueError naming `option` when `text` cannot be encoded as UTF-8: a lone surrogate, which is how Python
    passes on argument bytes that are not UTF-8 (`--prompt $'\\xed\\xa0\\x80abc'`); the tokenizer would raise a
    TypeError."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text[e.start:e.end].encode("utf-8", "surrogateescape") if all(
            "\udc80" <= c <= "\udcff" for c in text[e.start:e.end]) else text[e.start:e.end].encode("unicode_escape")
        raise ValueError(f"{option} is not valid UTF-8 text ({raw!r} at character {e.start}); pass UTF-8 text "
                         "(check the shell quoting and the terminal's encoding)") from None


# ------------------------------------------------------------------------------------------------- devices
def check_device(device: str) -> None:
    """A torch device string that this machine has (`dlm sample/eval --device`), else a ValueError saying so."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device {device!r} is not a device name: use cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this machine has no CUDA GPU that PyTorch can use "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s); use "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: Apple's MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: dlm runs on cpu, cuda or mps")


def check_accelerator(accelerator: str, devices: int) -> None:
    """trainer.accelerator / trainer.devices that this machine can give, else a ConfigError saying so."""
    from dlm.config import ConfigError

    if accelerator in ("gpu", "cuda"):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have == 0:
            raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU that PyTorch can "
                              "use (torch.cuda.is_available() is False); use trainer.accelerator=auto or cpu")
        if devices > have:
            raise ConfigError(f"trainer.devices={devices} but this machine has {have} GPU(s); use "
                              f"trainer.devices={have} or fewer")
    elif accelerator == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("trainer.accelerator=mps but Apple's MPS is not available here; use trainer.accelerator=auto")
    elif accelerator not in ("auto", "cpu", "gpu", "cuda", "mps", "tpu"):
        raise ConfigError(f"unknown trainer.accelerator {accelerator!r}; valid: auto, cpu, gpu (cuda), mps")


# ------------------------------------------------------------------------------------------------- sampling
def check_sampling_args(**args) -> None:
    """Sampling arguments that cannot mean anything are refused (ValueError naming the argument): temperature must
    be finite and >= 0; top_p in (0, 1]; lengths, strides, steps and counts positive integers (or None: default)."""
    for name, value in args.items():
        if value is None:
            continue
        if name in ("temperature", "cfg_scale"):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value} must be >= 0 and finite"
                                 + (" (0 = argmax, 1 = the model's distribution)" if name == "temperature" else ""))
        elif name == "top_p":
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 1):
                raise ValueError(f"top_p={value} must be in (0, 1] (1 = no nucleus filtering)")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value} must be a positive integer (leave it out for the default)")
