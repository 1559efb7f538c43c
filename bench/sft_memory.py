"""Peak resident memory of one SFT step of a ~0.5B-parameter LLaDA-layout model at 2,048 tokens, with and without
trainer.gradient_checkpointing and trainer.chunked_ce.

The model is dlm's network in LLaDA's layout (RMSNorm, SwiGLU, separate q/k/v, no biases, untied head, rope theta
500,000, LLaDA's vocabulary of 126,464 tokens), scaled down to width 1024, 18 layers, 16 heads, SwiGLU hidden 3072
(LLaDA-8B's ratio of 3): 504M parameters, 259M of them the embedding and the head. Random init, float32. The step:
the MDLM loss on one row of 2,048 tokens at t = 1 (every position but the first masked and scored: the largest
number of scored positions a 2,048-token row can have, as an SFT row whose response fills it), its backward, then
one fused AdamW step (the training module's optimizer). Each configuration runs in a fresh subprocess, which reports
its peak resident memory (getrusage ru_maxrss) after the backward and after the AdamW step (the optimizer's two
float32 moments, 8 bytes per parameter, are allocated at its first step, when the activations are already freed).

    nice python bench/sft_memory.py [--chunk 512] [--tokens 2048] [--d-model 1024 --layers 18 --heads 16 --mlp 3072]

A configuration whose estimated peak exceeds the memory available now (MemAvailable) is skipped and said so. Takes
minutes per configuration on a CPU (the step is ~6 x 0.5e9 x 2048 FLOPs, plus the recomputations).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB, MASK_ID = 126464, 126336  # LLaDA's vocabulary and [MASK] id
CONFIGS = {  # name: (gradient_checkpointing, chunked_ce); plain and both first, the extremes
    "plain": (False, False),
    "both": (True, True),
    "gradient checkpointing": (True, False),
    "chunked CE": (False, True),
}
GIB = 1024**3
HEADER = ("| configuration | peak RSS after forward + backward (GiB) | peak RSS after the AdamW step (GiB) | "
          "RSS with the model built (GiB) | forward + backward (s) | loss |\n|---|---:|---:|---:|---:|---:|")


def model_config(a):
    from dlm.network.config import ModelConfig

    return ModelConfig(n_layer=a.layers, n_head=a.heads, d_model=a.d_model, mlp_hidden=a.mlp, context=a.tokens,
                       vocab_size=a.vocab, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", fused_qkv=False,
                       rope_theta=500000.0)


def parameters(a) -> int:
    d, h = a.d_model, a.mlp
    return 2 * a.vocab * d + d + a.layers * (4 * d * d + 3 * d * h + 2 * d)


def estimate_bytes(a, checkpointing: bool, chunked: bool) -> int:
    """A coarse upper estimate of the step's peak (to skip what cannot fit): float32 weights and gradients; each
    block's saved activations (~12 (T, C) and 4 (T, H) tensors; only its input with checkpointing, plus one block's
    during its recomputation); the logits (N, V) with their float copy, log-softmax and gradient (one chunk's)."""
    T, d, h = a.tokens, a.d_model, a.mlp
    per_block = T * (12 * d + 4 * h) * 4
    blocks = a.layers * T * d * 4 + per_block if checkpointing else a.layers * per_block
    logits = 4 * (a.chunk if chunked else T) * a.vocab * 4
    return 8 * parameters(a) + blocks + logits + GIB // 2  # + torch and Python


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(a) -> None:
    """One configuration in this fresh process: build, one step, print a JSON line of its measurements."""
    import torch

    from dlm.network import Transformer
    from dlm.process import MDLMConfig, make_process

    checkpointing, chunked = CONFIGS[a.child]
    torch.manual_seed(0)
    net = Transformer(model_config(a)).train()
    net.gradient_checkpointing = checkpointing  # what the training module sets from trainer.gradient_checkpointing
    net.ce_chunk = a.chunk if chunked else 0  # ... and from trainer.chunked_ce
    process = make_process(MDLMConfig(), MASK_ID)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, MASK_ID, (1, a.tokens), generator=g)
    loss_mask = torch.ones_like(x, dtype=torch.bool)
    loss_mask[:, 0] = False  # BOS
    built = peak_rss_bytes()
    start = time.perf_counter()
    out = process.loss(net, {"input_ids": x, "loss_mask": loss_mask}, g, t=torch.ones(1))
    out.loss.backward()
    backward_s, backward_peak = time.perf_counter() - start, peak_rss_bytes()
    torch.optim.AdamW(net.parameters(), lr=1e-5, fused=True).step()
    print(json.dumps({"params": sum(p.numel() for p in net.parameters()), "scored": int(out.num_tokens),
                      "loss": float(out.loss), "built": built, "backward_peak": backward_peak,
                      "step_peak": peak_rss_bytes(), "backward_s": backward_s,
                      "step_s": time.perf_counter() - start}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--mlp", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=512, help="trainer.chunked_ce of the chunked rows")
    p.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.vocab <= MASK_ID:
        p.error(f"--vocab must exceed LLaDA's [MASK] id {MASK_ID}")
    if a.child:
        return child(a)

    print(f"LLaDA-layout network: width {a.d_model}, {a.layers} layers, {a.heads} heads, SwiGLU {a.mlp}, vocabulary "
          f"{a.vocab:,}: {parameters(a) / 1e6:.0f}M parameters, float32; one MDLM step at {a.tokens} tokens, batch 1, "
          f"t = 1; chunked CE: {a.chunk} positions per chunk\n{HEADER}", flush=True)
    rows = []
    for name, (checkpointing, chunked) in CONFIGS.items():
        need, free = estimate_bytes(a, checkpointing, chunked), available_bytes()
        if need > 0.9 * free:
            rows.append(f"| {name} | skipped: estimated {need / GIB:.1f} GiB, {free / GIB:.1f} GiB available | | | |")
            print(rows[-1], flush=True)
            continue
        args = [sys.executable, __file__, "--child", name, "--d-model", str(a.d_model), "--layers", str(a.layers),
                "--heads", str(a.heads), "--mlp", str(a.mlp), "--vocab", str(a.vocab), "--tokens", str(a.tokens),
                "--chunk", str(a.chunk)]
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ,
                                                                                   "PYTHONPATH": str(ROOT)})
        if done.returncode != 0:
            rows.append(f"| {name} | failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]} | | | |")
            print(rows[-1], flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(f"| {name} | {r['backward_peak'] / GIB:.2f} | {r['step_peak'] / GIB:.2f} | "
                    f"{r['built'] / GIB:.2f} | {r['backward_s']:.0f} | {r['loss']:.4f} |")
        print(f"{rows[-1]}  ({r['params'] / 1e6:.1f}M parameters, {r['scored']} positions scored, estimate was "
              f"{need / GIB:.1f} GiB)", flush=True)  # each row as it is measured: a long run's partial result
    print()
    print(HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
