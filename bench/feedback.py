"""Feedback overhead (dlm/process/feedback.py): a training step and a sampling step of MDLM with self-conditioning,
soft-masking and both, each over plain MDLM on the same network and batch.

    OMP_NUM_THREADS=1 python bench/feedback.py                 # the tiny preset: 4 layers, d 256, context 128,
                                                                # vocab 8192, batch 32, precision=auto
    python bench/feedback.py --repeats 3 --batch 8 --what sample

Training step = loss + backward + AdamW step with every feedback applied (p_sc = p_sm = 1: two passes each step).
Counted: pass 1 is one more forward, about 1/3 of a forward + backward, so ~4/3; self-conditioning adds a dense
(masked positions x V) x (V x C) product. Sampling step = one ancestral step without the cache (every variant calls
the network at every step), averaged over a run of `--steps` steps. Variants alternate within each repeat and the
median is reported, in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from dlm.config import ModelConfig
from dlm.data.batch import make_batch
from dlm.network import Transformer
from dlm.precision import describe_cpu, use_bf16
from dlm.process import ModelDescription, make_process
from dlm.process.mdlm import MDLMConfig
from dlm.process.self_conditioning import SelfConditioningConfig
from dlm.sampler import AncestralSampler, Canvas
from dlm.softmask import SoftMaskMixer
from dlm.softmask.process import SoftMaskedDiffusion

VARIANTS = ("mdlm", "sc", "sm", "sm+sc")


def processes(description: ModelDescription) -> dict:
    """variant -> process, every feedback applied to every training batch."""
    plain = make_process(MDLMConfig(), description)
    sc = make_process(SelfConditioningConfig(p_sc=1.0), description)
    with torch.no_grad():  # a non-zero projection, as after some training
        sc.projection.weight.normal_(0.0, 0.02)
    return {"mdlm": plain, "sc": sc, "sm": SoftMaskedDiffusion(plain, SoftMaskMixer(omega_s=0.5), p_sm=1.0),
            "sm+sc": SoftMaskedDiffusion(sc, SoftMaskMixer(omega_s=0.5), p_sm=1.0)}


def train_step(network, process, optimizer, batch, seed: int, autocast) -> float:
    generator = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with autocast():
        out = process.loss(network, batch, generator)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def sample_step(network, process, canvas, seed: int, steps: int, autocast) -> float:
    """Seconds per network call of one ancestral run without the cache, fed the process's feedback."""
    sampler = AncestralSampler(steps, cache=False, feedback=process.feedback())
    started = time.perf_counter()
    with autocast(), torch.no_grad():
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
    parser.add_argument("--precision", choices=("auto", "bf16", "32"), default="auto")
    parser.add_argument("--what", choices=("both", "train", "sample"), default="both")
    args = parser.parse_args()

    bf16 = use_bf16(args.precision, "cpu")

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, context=args.context,
                      vocab_size=args.vocab)
    network = Transformer(cfg)
    mask = args.vocab - 1
    variants = processes(ModelDescription(vocab_size=args.vocab, d_model=args.d_model, mask_id=mask,
                                          context=args.context))
    print(f"# {describe_cpu()}; threads {torch.get_num_threads()}; precision {'bf16' if bf16 else 'float32'}; "
          f"{args.n_layer} layers, d {args.d_model}, context {args.context}, vocab {args.vocab}, batch {args.batch}")
    print(f"{'what':8s} " + " ".join(f"{v:>12s}" for v in VARIANTS) + "   (median seconds; x = over mdlm)")
    if args.what in ("both", "train"):
        network.train()
        ids = torch.randint(0, mask, (args.batch, args.context), generator=torch.Generator().manual_seed(1))
        batch = make_batch(ids)
        shared = {id(p): p for v in variants.values() for p in v.parameters()}  # sm+sc holds sc's projection too
        params = list(network.parameters()) + list(shared.values())
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        times = {v: [] for v in VARIANTS}
        for r in range(args.repeats + 1):  # the first round warms up
            for v in VARIANTS:
                s = train_step(network, variants[v], optimizer, batch, r, autocast)
                if r:
                    times[v].append(s)
        report("train", times)
    if args.what in ("both", "sample"):
        network.eval()
        canvas = torch.full((args.batch, args.context), mask)
        canvas[:, 0] = 0
        times = {v: [] for v in VARIANTS}
        for r in range(args.repeats + 1):
            for v in VARIANTS:
                s = sample_step(network, variants[v], canvas, r, args.steps, autocast)
                if r:
                    times[v].append(s)
        report("sample", times)


def report(what: str, times: dict) -> None:
    med = {v: statistics.median(t) for v, t in times.items()}
    cells = [f"{med[v]:.4f} {med[v] / med['mdlm']:.2f}x" for v in VARIANTS]
    print(f"{what:8s} " + " ".join(f"{c:>12s}" for c in cells))


if __name__ == "__main__":
    main()
