"""Training throughput: MDLM vs AR at equal size, and model FLOP utilisation (MFU) against the machine's
measured matrix-multiply peak, for a plain PyTorch loop and for dlm's Lightning engine.

    python bench/train_throughput.py                    # width 512, 8 layers, context 256, precision=auto
    python bench/train_throughput.py --precision bf16 32  # both (bf16 on a CPU without bf16 instructions is slow)
    python bench/train_throughput.py --d-model 256 --n-layer 4 --context 128 --steps 6

MFU = model FLOPs per step / step time / peak, with model FLOPs = 6 N_matmul tokens + 12 n_layer d T tokens
(PaLM's formula: weights' matrix products forward + backward, plus attention scores), where MDLM's output
layer counts only on the masked positions it actually scores (half of the tokens in expectation over t).
The peak is the sustained throughput of back-to-back n^3 bf16 (or fp32) products, the best of n = 512, 1024, 2048,
measured in the same run.
The default precision is what training's precision=auto picks on this machine (dlm/precision.py): bf16 autocast
on CPUs with bf16 instructions (AVX512-BF16, AMX), float32 elsewhere.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from dlm.config import ModelConfig, RunConfig
from dlm.process import PROCESSES
from dlm.network import Transformer
from dlm.precision import cpu_has_fast_bf16, describe_cpu
from dlm.process import make_process
from dlm.data.batch import make_batch
from dlm.train.lit_module import DiffusionLightningModule


def matmul_peak(dtype: torch.dtype, sizes=(512, 1024, 2048), seconds: float = 1.5) -> float:
    """Sustained GFLOP/s of back-to-back n x n x n products, the best over `sizes` (each timed for about `seconds`,
    not a best-case burst). Several sizes, because the fastest one depends on the CPU's caches: on a 2-core AVX2
    EPYC, float32 ran at 55 GFLOP/s at 512 but 32 at 2048; with AMX, bf16 is fastest at 2048."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(3):
            a @ b
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - t0) / 1e9)
    return best


def model_flops_per_token(cfg: ModelConfig, process: str) -> float:
    """Training FLOPs per token: 6 x (weights used) + 12 x layers x d x context for attention, counted in full for
    both processes (PaLM's convention; the fused causal kernel that AR uses at long contexts skips the masked half,
    so AR's MFU is over-credited by ~3 % relative at width 512, context 256)."""
    d, layers = cfg.d_model, cfg.n_layer
    body = layers * (4 * d * d + 2 * cfg.mlp_ratio * d * d)  # attention projections + MLP
    head_fraction = 0.5 if process == "mdlm" else 1.0  # MDLM scores masked positions only: E[1 - alpha_t] = 1/2
    return 6 * (body + head_fraction * d * cfg.vocab_size) + 12 * layers * d * cfg.context


class FakeTokenizer:
    """Just enough tokenizer for the LightningModule (ids only; no text is involved in this benchmark)."""

    def __init__(self, vocab: int):
        self.vocab, self.mask_token_id = vocab, vocab - 1

    def __len__(self):
        return self.vocab


def plain_loop_step_time(cfg: ModelConfig, process_name: str, batch: dict, steps: int, bf16: bool) -> float:
    """A plain PyTorch loop: forward, loss, backward, clip, AdamW. Median seconds per step."""
    torch.manual_seed(0)
    net = Transformer(cfg)
    process = make_process(PROCESSES[process_name].config_class(), mask_id=cfg.vocab_size - 1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = process.loss(net, batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class StepTimer(L.Callback):
    def __init__(self):
        self.times, self._t0 = [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)


def lightning_step_time(cfg: ModelConfig, process_name: str, batch: dict, steps: int, bf16: bool) -> float:
    """The same step through dlm's LightningModule and a Lightning Trainer (EMA, logging, LR schedule, clipping)."""
    run = RunConfig(model=cfg, process=PROCESSES[process_name].config_class())
    run.trainer.ema = 0.9999
    module = DiffusionLightningModule(run, FakeTokenizer(cfg.vocab_size))
    data = torch.utils.data.DataLoader([batch] * (steps + 2), batch_size=None)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps + 2, precision="bf16-mixed" if bf16 else "32-true",
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer], limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=data)
    # Include the optimizer step, which runs inside the batch hooks; drop two warm-up steps.
    return statistics.median(timer.times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every configuration")
    parser.add_argument("--precision", nargs="+", choices=("bf16", "32"), default=None,
                        help="bf16 autocast and/or float32 (default: what precision=auto picks on this machine)")
    args = parser.parse_args()

    cfg = ModelConfig(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, context=args.context,
                      vocab_size=args.vocab)
    x = torch.randint(0, args.vocab - 1, (args.batch_size, args.context))
    batch = make_batch(x, None)
    tokens = x.numel()
    flops = {p: model_flops_per_token(cfg, p) * tokens for p in ("mdlm", "ar")}
    precisions = [{"bf16": "bf16", "32": "fp32"}[p] for p in (args.precision or ["bf16" if cpu_has_fast_bf16() else "32"])]
    peaks = {p: matmul_peak(torch.bfloat16 if p == "bf16" else torch.float32) for p in precisions}
    print(f"{describe_cpu()} | threads {torch.get_num_threads()} | matmul peak: "
          + ", ".join(f"{p} {peak:.0f} GFLOP/s" for p, peak in peaks.items()))
    print(f"model: {args.n_layer} layers, width {args.d_model}, context {args.context}, vocab {args.vocab}, "
          f"batch {args.batch_size} ({tokens} tokens/step), {flops['ar'] / 1e9:.0f} GFLOP/step (AR), "
          f"{flops['mdlm'] / 1e9:.0f} (MDLM)")
    # Interleave the configurations over several rounds and keep each one's best median: on a shared or
    # thermally throttled machine a single pass in a fixed order biases whichever runs last.
    best: dict[tuple, float] = {}
    for _ in range(args.rounds):
        for precision in precisions:
            for engine, fn in (("plain loop", plain_loop_step_time), ("dlm/Lightning", lightning_step_time)):
                for process in ("mdlm", "ar"):
                    dt = fn(cfg, process, batch, args.steps, precision == "bf16")
                    key = (precision, engine, process)
                    best[key] = min(best.get(key, float("inf")), dt)
    rows = [(*key, dt) for key, dt in best.items()]
    print(f"\n{'precision':9s}  {'engine':14s}  {'process':7s}  {'s/step':>7s}  {'tokens/s':>9s}  {'MFU':>6s}")
    for precision, engine, process, dt in rows:
        mfu = flops[process] / dt / (peaks[precision] * 1e9)
        print(f"{precision:9s}  {engine:14s}  {process:7s}  {dt:7.3f}  {tokens / dt:9.0f}  {mfu:6.1%}")
    step = {(p, e, proc): dt for p, e, proc, dt in rows}
    for precision in sorted({r[0] for r in rows}):
        for engine in ("plain loop", "dlm/Lightning"):
            print(f"{precision} {engine}: MDLM step / AR step = {step[(precision, engine, 'mdlm')] / step[(precision, engine, 'ar')]:.3f}")
        print(f"{precision}: Lightning step / plain-loop step (MDLM) = "
              f"{step[(precision, 'dlm/Lightning', 'mdlm')] / step[(precision, 'plain loop', 'mdlm')]:.3f}")


if __name__ == "__main__":
    main()
