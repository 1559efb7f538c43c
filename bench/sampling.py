"""Sampling speed: tokens/s and network calls (NFE) of the ancestral vs the cached ancestral sampler at several
step counts, and of the autoregressive baseline with its KV cache.

    python bench/sampling.py                       # a trained model: runs/demo-mdlm (and runs/demo-ar if present)
    python bench/sampling.py --model PATH --ar PATH --num-samples 16 --length 128

The cached sampler skips the network call of every step that commits no token, so its NFE is bounded by the
number of distinct commit events (at most the sequence length) however many steps are asked for.
Peak memory: dlm.memory.PeakMemory (on a CPU the process's peak resident memory during that generation).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import dlm


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def best_of(repeats: int, run):
    """The fastest of `repeats` runs of `run()` (the same seed: the same tokens and NFE every time)."""
    return min((run() for _ in range(max(1, repeats))), key=lambda gen: gen.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/demo-mdlm")
    parser.add_argument("--ar", default="runs/demo-ar")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--length", type=int, default=None, help="default: the model's context")
    parser.add_argument("--steps", default="16,64,256,1024")
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    args = parser.parse_args()
    if not Path(args.model).exists():
        raise SystemExit(f"no model at {args.model}: train one first (make demo), or pass --model PATH")
    model = dlm.load(args.model)
    length = args.length or model.context
    print(f"threads {torch.get_num_threads()} | {args.model}: {model.network.num_params(False):,} parameters | "
          f"{args.num_samples} samples x {length} tokens")
    model.generate(num_samples=args.num_samples, length=length, steps=4, batch_size=args.num_samples)  # warm-up
    print(f"(seconds: best of {args.repeats} runs after a warm-up)")
    print(f"\n{'sampler':16s} {'steps':>6s} {'NFE':>6s} {'seconds':>8s} {'tokens/s':>9s} {'speed-up':>9s} {'peak MiB':>9s}")
    for steps in [int(s) for s in args.steps.split(",")]:
        base = None
        for name in ("ancestral", "ancestral_cache"):
            gen = best_of(args.repeats, lambda: model.generate(num_samples=args.num_samples, length=length,
                                                              sampler=name, steps=steps, seed=0,
                                                              batch_size=args.num_samples))
            base = base or gen.seconds
            print(f"{name:16s} {steps:6d} {gen.nfe:6d} {gen.seconds:8.2f} {gen.tokens_per_second:9.0f} "
                  f"{base / gen.seconds:8.2f}x {mib(gen.peak_memory_mib):>9s}")
    if Path(args.ar).exists():
        ar = dlm.load(args.ar)
        ar.generate(num_samples=args.num_samples, length=length, seed=0, batch_size=args.num_samples)  # warm-up
        gen = best_of(args.repeats, lambda: ar.generate(num_samples=args.num_samples, length=length, seed=0,
                                                        batch_size=args.num_samples))
        print(f"{'AR + KV cache':16s} {'-':>6s} {gen.nfe:6d} {gen.seconds:8.2f} {gen.tokens_per_second:9.0f} "
              f"{'-':>9s} {mib(gen.peak_memory_mib):>9s}")


if __name__ == "__main__":
    main()
