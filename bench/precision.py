"""bf16 vs float32 on this machine: matrix-multiply throughput and a tiny-model training step, and what
`precision=auto` picks here (dlm/precision.py: bf16 only on CPUs with AVX512-BF16 or AMX instructions).

    python bench/precision.py
    python bench/precision.py --sizes 256 1024 --seconds 1

Each product is timed back to back for about `--seconds` after three warm-up products (`matmul_peak` of
train_throughput.py at one size); the training step is that benchmark's plain loop (forward, loss, backward,
clipping, AdamW) at the tiny preset's shape (4 layers, width 256, context 128, vocab 8192), batch 8, median of 3.
"""

from __future__ import annotations

import argparse

import torch
from train_throughput import matmul_peak, plain_loop_step_time  # bench/ is on the path when run as a script

from dlm.config import ModelConfig
from dlm.precision import cpu_has_fast_bf16, describe_cpu
from dlm.data.batch import make_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 512, 1024])
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    print(f"{describe_cpu()} | {torch.get_num_threads()} threads")
    print(f"\n| what | float32 | bf16 | bf16 / float32 speed |\n|---|---:|---:|---:|")
    for n in args.sizes:
        f32, bf16 = (matmul_peak(dtype, sizes=(n,), seconds=args.seconds) for dtype in (torch.float32, torch.bfloat16))
        print(f"| {n}^3 product, GFLOP/s | {f32:.1f} | {bf16:.1f} | {bf16 / f32:.2f}x |", flush=True)
    cfg = ModelConfig(n_layer=4, n_head=4, d_model=256, context=128, vocab_size=8192)
    batch = make_batch(torch.randint(0, 8191, (8, 128), generator=torch.Generator().manual_seed(0)), None)
    f32, bf16 = (plain_loop_step_time(cfg, "mdlm", batch, steps=3, bf16=bf16) for bf16 in (False, True))
    print(f"| tiny-preset training step (batch 8), s | {f32:.3f} | {bf16:.3f} | {f32 / bf16:.2f}x |")
    print(f"\nprecision=auto uses {'bf16 autocast' if cpu_has_fast_bf16() else 'float32'} on this CPU")


if __name__ == "__main__":
    main()
