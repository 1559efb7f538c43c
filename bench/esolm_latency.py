"""Sampling latency vs length, batch 1: AR with its KV cache, MDLM (no cache), BD3-LM with its KV cache, Eso-LM (B).

    OMP_NUM_THREADS=1 python bench/esolm_latency.py [--lengths 256 512 2048 8192] [--mdlm-steps 32]

A randomly initialised network of the tiny preset's shape (4 layers x 256 wide, 4 heads; speed does not depend on
the weights; its context is set to the longest length) generates L tokens after a BOS, one token per network call
(first-hitting) for every method:
  * AR: the autoregressive sampler with its KV cache (one token fed per call);
  * MDLM: the first-hitting sampler, every call runs the whole canvas (no cache is exact for it);
  * BD3-LM: the blockwise sampler, block `--block` (default 4), first-hitting inside the block, with its KV cache
    (plus one cache-filling call per block);
  * Eso-LM (B): process esolm (causal attention), `--sampler esolm` with the first-hitting schedule at alpha0
    (`--alpha0`, default 0.5): each call feeds the last step's token (appended to the cache) and the current mask.
MDLM's calls all cost the same (the whole canvas), so at long lengths it runs only its first `--mdlm-steps` calls
(a callback stops it) and its time per token is that of those calls, marked "capped" in the table.
Prints seconds, NFE, ms per generated token (the fastest of `--repeats` sweeps of the whole grid), each method's per-token cost vs its
shortest length, and the ratios issue 22 asks for. Each run is timed twice: wall time, and the CPU time of this
process (`time.process_time`). With one torch thread (OMP_NUM_THREADS=1) the CPU time is the work done, while the
wall time also counts the time spent waiting for a core, which on a shared machine moves by up to 2x between cells;
the ratios are computed on CPU time (`--clock`, default cpu; use wall on a quiet machine or with several threads): Eso-LM's time per token at 2,048 / at 256 tokens (<= 1.3), and
at 2,048 tokens Eso-LM vs MDLM (>= 10x faster) and vs BD3-LM with its cache (faster, at about equal NFE).
"""

from __future__ import annotations

import argparse
import time

import torch

from dlm.config import ModelConfig
from dlm.network import Transformer
from dlm.process import Autoregressive, MaskedDiffusion
from dlm.process.block_diffusion import BlockDiffusion
from dlm.process.esolm import EsoLM
from dlm.process.schedules import make_schedule
from dlm.sampler import Canvas
from dlm.sampler.autoregressive import AutoregressiveSampler
from dlm.sampler.blockwise import BlockwiseSampler
from dlm.sampler.esolm import EsoLMSampler
from dlm.sampler.first_hitting import FirstHittingSampler

METHODS = ("AR (KV cache)", "MDLM", "BD3-LM (KV cache)", "Eso-LM (B)")


def setups(mask_id: int, block: int, alpha0: float) -> dict:
    """method -> (process, sampler)."""
    schedule = make_schedule("loglinear", 1e-3)
    return {
        "AR (KV cache)": (Autoregressive(mask_id), AutoregressiveSampler(kv_cache=True)),
        "MDLM": (MaskedDiffusion(schedule, mask_id), FirstHittingSampler()),
        "BD3-LM (KV cache)": (BlockDiffusion(schedule, mask_id, block), BlockwiseSampler(FirstHittingSampler(), block,
                                                                                          kv_cache=True)),
        "Eso-LM (B)": (EsoLM(mask_id, alpha0=alpha0, attention="causal"), EsoLMSampler(schedule="first_hitting")),
    }


def run(network, process, sampler, length: int, device, max_steps: int | None = None):
    """One generation of `length` tokens after a BOS: (seconds, NFE, tokens generated)."""
    canvas = torch.full((1, length + 1), process.mask_id if process.mask_id is not None else 0, device=device)
    canvas[:, 0] = 0  # BOS
    fixed = torch.zeros_like(canvas, dtype=torch.bool)
    fixed[:, 0] = True
    steps = []

    def stop(event):  # MDLM capped: stop after max_steps calls
        steps.append(event.nfe)
        return max_steps is not None and event.nfe >= max_steps

    if device.type == "cuda":
        torch.cuda.synchronize()
    started, cpu_started = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = sampler.sample(network, process, Canvas.from_fixed(canvas, fixed, process),
                             [torch.Generator(device=device).manual_seed(0)], stop if max_steps else None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    generated = length if not bool(out.stopped.any()) else len(steps)  # first-hitting: one token per step
    return seconds, cpu, out.nfe, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 2048, 8192])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                        help=f"which to run (default all): {', '.join(repr(m) for m in METHODS)}")
    parser.add_argument("--mdlm-steps", type=int, default=32,
                        help="MDLM runs at most this many calls per length (0: all); its per-token time is theirs")
    parser.add_argument("--block", type=int, default=4, help="BD3-LM's block size (4 or 16)")
    parser.add_argument("--alpha0", type=float, default=0.5, help="Eso-LM's alpha0 (the cost per call is the same)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="sweeps of the whole grid; each cell keeps its fastest run (3 on a shared machine)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="the time the ratios and 'vs shortest' use: this process's CPU time (default; one thread "
                             "on a shared machine) or wall time")
    parser.add_argument("--plot", default=None, help="also draw ms per token against length into this PNG")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    lengths = sorted(args.lengths)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=4, n_head=4, d_model=256, mlp_ratio=4, context=max(lengths) + 1, vocab_size=args.vocab)
    network = Transformer(cfg).eval().to(device)
    methods = {m: s for m, s in setups(cfg.vocab_size - 1, args.block, args.alpha0).items() if m in args.methods}
    capability = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else torch.cuda.get_device_name()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {device} ({capability}); tiny network "
          f"(4 layers x 256, 4 heads), vocabulary {cfg.vocab_size}, float32, batch 1; BD3-LM block {args.block}; "
          f"Eso-LM alpha0 {args.alpha0}; first-hitting everywhere (one token per call)", flush=True)
    for method, (process, sampler) in methods.items():  # warm-up
        run(network, process.to(device), sampler, 16, device)
    clock = 1 if args.clock == "cpu" else 0  # index into run()'s (seconds, cpu seconds)
    best = {}  # (method, length) -> (seconds, cpu, NFE, generated): the fastest run; repeats sweep the whole grid in
    for r in range(args.repeats):  # turn, so a slow spell of a shared machine does not land on one length only
        for method, (process, sampler) in methods.items():
            for length in lengths:
                cap = args.mdlm_steps if method == "MDLM" and 0 < args.mdlm_steps < length else None
                got = run(network, process, sampler, length, device, cap)
                if (method, length) not in best or got[clock] < best[method, length][clock]:
                    best[method, length] = got
                print(f"  run {r + 1}/{args.repeats}: {method}, {length} tokens: {got[0]:.2f} s wall, "
                      f"{got[1]:.2f} s CPU", flush=True)
    print(f"\nratios on {args.clock} time")
    print(f"{'method':<18} {'length':>6} {'NFE':>6} {'wall s':>8} {'CPU s':>8} {'ms/token wall':>13} "
          f"{'ms/token CPU':>12} {'vs shortest':>11}  note")
    per_token = {}
    for method in methods:
        for length in lengths:
            seconds, cpu, nfe, generated = best[method, length]
            per_token[method, length] = (seconds, cpu)[clock] / generated
            first = per_token[method, lengths[0]]
            note = f"capped: first {generated} of {length} calls" if generated < length else ""
            print(f"{method:<18} {length:>6} {nfe:>6} {seconds:>8.2f} {cpu:>8.2f} {1e3 * seconds / generated:>13.3f} "
                  f"{1e3 * cpu / generated:>12.3f} {per_token[method, length] / first:>10.2f}x  {note}")
    if args.plot:
        plot(per_token, list(methods), lengths, args)
    eso = "Eso-LM (B)"
    print()
    if (eso, 256) in per_token and (eso, 2048) in per_token:
        ratio = per_token[eso, 2048] / per_token[eso, 256]
        print(f"Eso-LM {args.clock} time per token at 2,048 / at 256 tokens: {ratio:.2f} (target <= 1.3: "
              f"{'met' if ratio <= 1.3 else 'NOT met'})")
    for length in lengths:
        if (eso, length) not in per_token:
            continue
        for other, target in (("MDLM", 10.0), ("BD3-LM (KV cache)", 1.0), ("AR (KV cache)", None)):
            if (other, length) in per_token:
                speedup = per_token[other, length] / per_token[eso, length]
                goal = ""
                if target is not None and length == 2048:
                    met = speedup >= target if target > 1 else speedup > target
                    goal = f" (target {'>= 10x' if target > 1 else '> 1x'}: {'met' if met else 'NOT met'})"
                print(f"at {length:>5} tokens Eso-LM is {speedup:6.2f}x as fast per token as {other}{goal}")


def plot(per_token: dict, methods: list, lengths: list, args) -> None:
    """ms per generated token against length, log-log, one line per method (MDLM: its capped calls)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        ax.plot(lengths, [1e3 * per_token[method, n] for n in lengths], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens generated (batch 1)")
    ax.set_ylabel(f"ms per token ({args.clock} time)")
    ax.set_title("one token per network call; MDLM: its first calls", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
