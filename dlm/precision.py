"""Which arithmetic "auto" precision means: bf16 autocast where the hardware runs it fast, float32 elsewhere.

On a CPU, bf16 matrix products are fast only with bf16 instructions (AVX512-BF16, or AMX on Intel Sapphire
Rapids and later): with AMX, oneDNN ran them at 720-900 GFLOP/s on 2 cores (bench/train_throughput.py).
Without them (AVX2-only CPUs such as AMD Zen 1-3 or most laptops before 2023) PyTorch emulates bf16, far slower
than float32: `python bench/precision.py` measured 1.4 vs 58 GFLOP/s for 512^3 products and a tiny-model training
step 20x slower on a 2-core AMD EPYC (Zen 1). On GPUs, bf16 where `torch.cuda.is_bf16_supported()`.
"""

from __future__ import annotations

import functools

import torch



@functools.lru_cache(maxsize=1)
def _cpu_capabilities() -> dict:
    """PyTorch's reading of this CPU (name, cache sizes, instruction sets as booleans)."""
    return torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}


PRECISIONS = ("auto", "bf16", "32")  # trainer.precision: "auto" = bf16 only where it is fast (below)


WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_dtype(value) -> torch.dtype | None:
    """The weights' dtype asked at load (`dlm.load(path, dtype=...)`, `--dtype`): "float32", "bfloat16", "float16"
    (or those torch dtypes), or None / "auto" = as stored. Anything else: a ValueError naming the valid values."""
    if value is None or value == "auto":
        return None
    if isinstance(value, torch.dtype) and value in WEIGHT_DTYPES.values():
        return value
    if isinstance(value, str) and value in WEIGHT_DTYPES:
        return WEIGHT_DTYPES[value]
    raise ValueError(f"dtype={value!r} is not a weight dtype; valid: auto (as stored), {', '.join(WEIGHT_DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16)."""
    caps = _cpu_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def use_bf16(precision: str, device_type: str) -> bool:
    """Whether `precision` ("auto", "bf16" or "32") computes in bf16 autocast on `device_type` ("cpu", "cuda")."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision == "bf16"
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and cpu_has_fast_bf16()


def describe_cpu() -> str:
    """One line for logs: the CPU's name, vector capability and whether "auto" uses bf16 there."""
    bf16 = "bf16 autocast" if cpu_has_fast_bf16() else "float32 (no bf16 instructions)"
    name = _cpu_capabilities().get("cpu_name", "cpu")
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}: precision=auto -> {bf16}"
