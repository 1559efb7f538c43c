"""Soft-masking overhead: an SM training step and an SM sampling step, each over its plain MDLM counterpart.

    OMP_NUM_THREADS=1 python bench/softmask.py                 # the tiny preset: 4 layers, d 256, context 128,
                                                                # vocab 8192, batch 32, precision=auto as in training
    python bench/softmask.py --repeats 7 --precision 32

Training step = loss + backward + AdamW step on one batch (p_sm = 1, so every step is a soft-masked one).
Theory: pass 1 is one more forward, about 1/3 of a plain forward + backward, so SM / plain ~ 4/3 (target at
most 1.35x). Sampling step = one ancestral step (network call, commits, and for SM the feedback: entropy,
top-k and the gathered k + 1 embedding rows per masked position), averaged over a whole run of `--steps`
steps, both without the cache so both call the network at every step (target at most 1.1x).
Plain and SM runs alternate (interleaved repeats) and the median time is reported, in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from dlm.config import ModelConfig
from dlm.network import Transformer
from dlm.precision import describe_cpu, use_bf16
from dlm.process import MaskedDiffusion
from dlm.process.schedules import LogLinearSchedule
from dlm.sampler import AncestralSampler, Canvas
from dlm.softmask import SoftMaskFeedback, SoftMaskMixer, softmask_loss
from dlm.data.batch import make_batch


def train_step(network, mixer, optimizer, process, batch, seed: int, sm: bool, autocast) -> float:
    """Seconds for one training step (forward(s), backward, optimizer)."""
    generator = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with autocast():
        if sm:
            out, _ = softmask_loss(process, network, mixer, batch, generator, p_sm=1.0)
        else:
            out = process.loss(network, batch, generator)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def sample_step(network, process, canvas, seed: int, feedback, steps: int, autocast) -> float:
    """Seconds per network call of one ancestral sampling run (no cache)."""
    sampler = AncestralSampler(steps, cache=False, feedback=feedback)
    started = time.perf_counter()
    with autocast():
        out = sampler.sample(network, process, Canvas.from_fixed(canvas, canvas != process.mask_id),
                             generator=torch.Generator().manual_seed(seed))
    return (time.perf_counter() - started) / out.nfe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32, help="sampling steps per measured run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--precision", choices=("auto", "bf16", "32"), default="auto",
                        help="auto: bf16 autocast on CPUs with bf16 instructions, else float32 (dlm/precision.py)")
    parser.add_argument("--what", choices=("both", "train", "sample"), default="both")
    args = parser.parse_args()

    bf16 = use_bf16(args.precision, "cpu")

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, context=args.context,
                      vocab_size=args.vocab)
    network = Transformer(cfg)
    mask_id = args.vocab - 1
    process = MaskedDiffusion(LogLinearSchedule(1e-3), mask_id)
    mixer = SoftMaskMixer(k=args.k, omega_s=0.5)
    optimizer = torch.optim.AdamW([*network.parameters(), *mixer.parameters()], lr=1e-4)
    ids = torch.randint(0, mask_id, (args.batch, args.context), generator=torch.Generator().manual_seed(0))
    batch = make_batch(ids, None)

    plain_train, sm_train = [], []
    # the first round of each loop warms up (allocator, oneDNN kernels) and is dropped
    for r in range(args.repeats + 1 if args.what != "sample" else 0):
        p = train_step(network, mixer, optimizer, process, batch, r, False, autocast)
        s = train_step(network, mixer, optimizer, process, batch, r, True, autocast)
        if r:
            plain_train.append(p), sm_train.append(s)

    network.eval()
    canvas = torch.full((args.batch, args.context), mask_id)
    canvas[:, 0] = 0
    feedback = SoftMaskFeedback(mixer, mask_id)
    plain_sample, sm_sample = [], []
    with torch.no_grad():
        for r in range(args.repeats + 1 if args.what != "train" else 0):
            p = sample_step(network, process, canvas, r, None, args.steps, autocast)
            s = sample_step(network, process, canvas, r, feedback, args.steps, autocast)
            if r:
                plain_sample.append(p), sm_sample.append(s)

    rows = [("training step", plain_train, sm_train, "4/3 (target <= 1.35)"),
            (f"sampling step ({args.steps}-step runs)", plain_sample, sm_sample, "target <= 1.10")]
    print(describe_cpu())
    print(f"model: {args.n_layer} layers, d {args.d_model}, context {args.context}, vocab {args.vocab}, batch "
          f"{args.batch}, k {args.k}, precision {args.precision} ({'bf16' if bf16 else 'float32'}), "
          f"{torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved repeats")
    print(f"| {'':34s} | plain (ms) | SM (ms) | SM / plain | theory / target |")
    print(f"|{'-' * 36}|-----------:|--------:|-----------:|-----------------|")
    for name, plain, sm, note in rows:
        if not plain:
            continue
        mp, ms = statistics.median(plain), statistics.median(sm)
        print(f"| {name:34s} | {mp * 1e3:10.1f} | {ms * 1e3:7.1f} | {ms / mp:10.3f} | {note:15s} |")


if __name__ == "__main__":
    main()
