"""dlm's attention (what training runs), SDPA and FlexAttention for the block-diffusion training mask, here.

    OMP_NUM_THREADS=1 python bench/block_attention.py [--quick]

Times one attention call (forward and forward+backward) on [z_t ; x] (length 2L) with the mask of
dlm.process.block_mask, for dlm.network.attention.attend (on a CPU its chunked kernel, on a GPU SDPA: what
training calls), SDPA (dense boolean mask), eager FlexAttention and compiled FlexAttention, checks they agree,
and prints milliseconds per call.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

from dlm.network.attention import attend
from dlm.process.block_mask import flex_available, flex_block_mask, training_mask


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip compiled FlexAttention")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    shapes = [(8, 4, 64, 16, 4)] if args.quick else [(8, 4, 64, 16, 4), (8, 4, 128, 32, 16), (4, 4, 512, 64, 16)]
    repeats = 3 if args.quick else 10
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'heads':>5} {'L':>5} {'hd':>4} {'B':>3}  {'kernel':<18} {'fwd ms':>9} {'fwd+bwd ms':>11}")
    for batch, heads, L, hd, block in shapes:
        q, k, v = (torch.randn(batch, heads, 2 * L, hd, requires_grad=True) for _ in range(3))
        mask = training_mask(L, block)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        kernels = {"dlm attend (bool)": lambda q, k, v: attend(q, k, v, mask),
                   "sdpa (bool mask)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)}
        if flex_available():
            from torch.nn.attention.flex_attention import flex_attention

            bm = flex_block_mask(L, block, kernel_block=min(128, 2 * L))
            kernels["flex (eager)"] = lambda q, k, v: flex_attention(q, k, v, block_mask=bm)
            if not args.no_compile:
                torch._dynamo.reset()  # a fresh compile per shape (else later shapes silently fall back to eager)
                compiled = torch.compile(flex_attention, dynamic=False)
                kernels["flex (compiled)"] = lambda q, k, v: compiled(q, k, v, block_mask=bm)
        qd, kd, vd = q.detach(), k.detach(), v.detach()  # FlexAttention on CPU refuses inputs that need grad
        for name, fn in kernels.items():
            row = f"{batch:>5} {heads:>5} {L:>5} {hd:>4} {block:>3}  {name:<18}"
            try:
                t0 = time.perf_counter()
                out = fn(qd, kd, vd)
                first = time.perf_counter() - t0
                err = (out - ref).abs().max().item()
                fwd = timed(lambda: fn(qd, kd, vd), repeats)
            except Exception as e:  # report, don't hide: a kernel that fails on CPU is a result too
                print(f"{row} forward failed: {type(e).__name__}: {str(e)[:100]}")
                continue
            try:
                bwd = f"{timed(lambda: fn(q, k, v).sum().backward(), repeats):>11.2f}"
            except Exception as e:
                bwd = f"{'n/a':>11} ({type(e).__name__}: {str(e)[:60]})"
            note = f"  max|diff|={err:.1e}" + (f", first call {first:.1f} s" if "compiled" in name else "")
            print(f"{row} {fwd:>9.2f} {bwd}{note}")


if __name__ == "__main__":
    main()
