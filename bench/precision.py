"""bf16 vs float32 on this machine: matrix-multiply throughput and a tiny-model training step, and what
`precision=auto` picks here (dlm/precision.py: bf16 only on CPUs with AVX512-BF16 or AMX instructions).

    python bench/precision.py
    python bench/precision.py --sizes 256 1024 --seconds 1

Each product is timed back to back for about `--seconds` (at least once); the training step is the tiny
preset's shape (4 layers, width 256, context 128, vocab 8192) at batch 8, median of 3 after one warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import dlm  # noqa: F401  (the allocator setting, as in training)
from dlm.config import ModelConfig, ProcessConfig
from dlm.network import Transformer
from dlm.precision import cpu_has_fast_bf16, describe_cpu
from dlm.process import make_process
from dlm.train.data_module import make_batch


def matmul_gflops(n: int, dtype: torch.dtype, seconds: float) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, t0 = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e9


def train_step_seconds(bf16: bool, batch_size: int = 8) -> float:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=4, n_head=4, d_model=256, context=128, vocab_size=8192)
    net, process = Transformer(cfg), make_process(ProcessConfig(name="mdlm"), mask_id=8191)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batch = make_batch(torch.randint(0, 8191, (batch_size, 128)), None)
    times = []
    for i in range(4):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = process.loss(net, batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 512, 1024])
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    print(f"{describe_cpu()} | {torch.get_num_threads()} threads")
    print(f"\n| what | float32 | bf16 | bf16 / float32 speed |\n|---|---:|---:|---:|")
    for n in args.sizes:
        f32, bf16 = matmul_gflops(n, torch.float32, args.seconds), matmul_gflops(n, torch.bfloat16, args.seconds)
        print(f"| {n}^3 product, GFLOP/s | {f32:.1f} | {bf16:.1f} | {bf16 / f32:.2f}x |", flush=True)
    f32, bf16 = train_step_seconds(False), train_step_seconds(True)
    print(f"| tiny-preset training step (batch 8), s | {f32:.3f} | {bf16:.3f} | {f32 / bf16:.2f}x |")
    print(f"\nprecision=auto uses {'bf16 autocast' if cpu_has_fast_bf16() else 'float32'} on this CPU")


if __name__ == "__main__":
    main()
