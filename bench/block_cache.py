"""Blockwise BD3-LM generation with and without the KV cache: tokens/s, NFE and cost per token vs length.

    OMP_NUM_THREADS=1 python bench/block_cache.py [--quick]

A randomly initialised network (speed does not depend on the weights) with a 2048-token context generates 256, 1024
and 2048 tokens block by block with the first-hitting inner sampler (one token per call, so NFE is the same with and
without the cache, apart from the cache-filling passes). Two settings:
  * full context: the network sees every earlier token. With the cache each call runs only the current block against
    the cached keys/values (every finished block computed once): the remaining growth of the cost per token is the
    attention over the cache itself, as in any KV-cached autoregressive model. Without it every call recomputes the
    whole prefix, so the cost per token grows with the length.
  * sliding window (--window, default 256 tokens): the network sees at most a window; with the cache the cost per
    token is then flat in the length.
Prints ms per generated token (fastest of up to 3 runs), its ratio to the shortest length (flat = 1.00x) and the
cache's speed-up, and checks that cached and uncached generation give identical tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

from dlm.config import ModelConfig
from dlm.network import Transformer
from dlm.process.block_diffusion import BlockDiffusion
from dlm.process.schedules import make_schedule
from dlm.sampler import Canvas
from dlm.sampler.blockwise import BlockwiseSampler
from dlm.sampler.first_hitting import FirstHittingSampler


def generate(network, process, length: int, kv_cache: bool, batch: int, window: int | None, seed: int = 0):
    canvas = torch.full((batch, length), process.mask_id)
    canvas[:, 0] = 0  # BOS
    sampler = BlockwiseSampler(FirstHittingSampler(), process.block_size, kv_cache=kv_cache, window=window)
    started = time.perf_counter()
    out = sampler.sample(network, process, Canvas.from_fixed(canvas, canvas != process.mask_id),
                         generator=torch.Generator().manual_seed(seed))
    out.seconds = time.perf_counter() - started  # the caller times: samplers do not
    return out


def fastest(network, process, length: int, kv_cache: bool, batch: int, window: int | None):
    """The fastest of up to 3 identical runs (stopping once 10 s are spent): timings on a shared machine are noisy."""
    best, spent = None, 0.0
    for _ in range(3):
        out = generate(network, process, length, kv_cache, batch, window)
        best = out if best is None or out.seconds < best.seconds else best
        spent += out.seconds
        if spent > 10.0:
            break
    return best


def bench(network, process, lengths: list[int], batch: int, window: int | None, title: str) -> None:
    print(f"\n{title}")
    print(f"{'length':>6} {'cache':>6} {'NFE':>6} {'seconds':>8} {'tokens/s':>9} {'ms/token':>9} {'vs first':>9} "
          f"{'speed-up':>9}", flush=True)
    outs = {}
    for kv in (True, False):
        first = None
        for length in lengths:
            out = fastest(network, process, length, kv, batch, window)
            outs[kv, length] = out
            n = (length - 1) * batch  # generated tokens
            per_token = out.seconds / n * 1e3
            first = first or per_token
            speedup = f"{outs[False, length].seconds / outs[True, length].seconds:>8.1f}x" if not kv else f"{'':>9}"
            print(f"{length:>6} {'yes' if kv else 'no':>6} {out.nfe:>6} {out.seconds:>8.2f} {n / out.seconds:>9.1f} "
                  f"{per_token:>9.3f} {per_token / first:>8.2f}x {speedup}", flush=True)
    for kv in (True, False):
        ratio = (outs[kv, lengths[-1]].seconds / (lengths[-1] - 1)) / (outs[kv, lengths[0]].seconds / (lengths[0] - 1))
        print(f"  {'with' if kv else 'without'} cache: cost per token at {lengths[-1]} tokens = {ratio:.2f}x that at "
              f"{lengths[0]} tokens")
    same = all(torch.equal(outs[True, n].tokens, outs[False, n].tokens) for n in lengths)
    print(f"  cached and uncached generation give identical tokens: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="lengths 64, 128, 256, window 64, a smaller network")
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--window", type=int, default=256, help="the sliding-window setting")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=2)
    args = parser.parse_args()
    lengths = [64, 128, 256] if args.quick else [256, 1024, 2048]
    d_model, window = (64, 64) if args.quick else (args.d_model, args.window)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=args.n_layer, n_head=4, d_model=d_model, context=max(lengths), vocab_size=1024)
    network = Transformer(cfg).eval()
    process = BlockDiffusion(make_schedule("loglinear", 1e-3), mask_id=cfg.vocab_size - 1, block_size=args.block)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); network {args.n_layer} layers x {d_model} "
          f"wide, context {cfg.context}, vocabulary {cfg.vocab_size}; block {args.block}, batch {args.batch}; "
          "first-hitting inner sampler (one token per call)")
    generate(network, process, 2 * args.block, True, args.batch, None)  # warm-up
    bench(network, process, lengths, args.batch, None, "full context (every earlier token visible)")
    bench(network, process, lengths, args.batch, window, f"sliding window of {window} tokens")
    print("\nNFE counts every network call; with the cache it includes one cache-filling pass per finished block "
          "(after a window slide, that pass re-encodes the kept tokens).")


if __name__ == "__main__":
    main()
