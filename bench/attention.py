"""Attention on CPU: PyTorch's SDPA kernels vs dlm's chunked attention (dlm.network.attention), forward +
backward in bf16 at the shapes of the presets, and the chunk size.

    python bench/attention.py                     # bf16 (what autocast feeds it on a CPU with bf16 instructions)
    python bench/attention.py --dtype float32 --lengths 128 256 --heads 4   # the tiny preset's attention in float32

Columns: the fused SDPA kernel (what PyTorch picks on CPU), the plain three-op version (matmul, float32 softmax,
matmul: what autograd stores in full), and dlm's chunked attention at three chunk budgets (float32 scores per
group of heads; 4 MiB is the default `SCORE_BYTES`), bidirectional and causal. Median of 5 after a warm-up;
ratios are fused / chunked at the default budget. (Plain causal self-attention longer than 128 tokens stays with
the fused kernel, which skips the masked half of the products.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import dlm.network.attention as attention


def three_ops(q, k, v, causal):
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        scores = scores.masked_fill(~torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(), float("-inf"))
    return torch.matmul(torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype), v)


def timed(fn, repeats=5) -> float:
    fn().sum().backward()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn().sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def chunked(q, k, v, causal, score_bytes):
    attention.SCORE_BYTES = score_bytes
    return attention.chunked_attention(q, k, v, None, causal)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("bf16", "float32"), default="bf16",
                        help="input dtype (dlm uses the chunked kernel on CPUs for bf16 only: attention.CHUNKED_DTYPES)")
    parser.add_argument("--lengths", type=int, nargs="*", default=[128, 256, 1024])
    parser.add_argument("--heads", type=int, default=8, help="heads of 64 (the tiny preset has 4, small 12)")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    shapes = [(max(1, 4096 // n), n) for n in args.lengths]  # 4,096 tokens per batch: (32, 128), (16, 256), (4, 1024)
    budgets = (1 << 18, 1 << 20, 1 << 22)
    print(f"threads {torch.get_num_threads()} | {args.dtype}, {args.heads} heads of 64, forward + backward, "
          "median of 5\n")
    print("| batch | tokens | causal | fused SDPA | three ops | "
          + " | ".join(f"chunked {b >> 10} KiB" for b in budgets) + " | fused / chunked (4 MiB) |")
    print("|------:|-------:|:------:|-----------:|----------:|" + "---------------:|" * len(budgets)
          + "------------------------:|")
    default = attention.SCORE_BYTES
    for causal in (False, True):
        for batch, length in shapes:
            q, k, v = (torch.randn(batch, args.heads, length, 64, dtype=dtype, requires_grad=True) for _ in range(3))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                fused = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            plain = timed(lambda: three_ops(q, k, v, causal))
            ours = [timed(lambda: chunked(q, k, v, causal, b)) for b in budgets]
            attention.SCORE_BYTES = default
            cells = " | ".join(f"{t * 1e3:12.1f} ms" for t in ours)
            print(f"| {batch:5d} | {length:6d} | {'yes' if causal else 'no':>6s} | {fused * 1e3:7.1f} ms | "
                  f"{plain * 1e3:6.1f} ms | {cells} | {fused / ours[2]:23.2f}x |")

if __name__ == "__main__":
    main()
