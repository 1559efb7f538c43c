"""The renoising sampler (`renoise`, docs/renoise.md): its cost per step against MDLM's ancestral sampler at equal
NFE, and the calls its adaptive stopping saves at equal quality.

    python bench/renoise.py                          # both parts (part 2 trains a small Sudoku MDLM, ~1 min)
    python bench/renoise.py --part cost --threads 1  # part 1 only

Part 1, cost per step. One random network (2 layers, d_model 128, context 128, vocabulary 300), a batch of 16
canvases of 128 positions to generate, and at the same number of network calls (S steps, adaptive stopping off):
MDLM's `ancestral` (no cache: one call per step), `renoise` on the same MDLM (absorbing: renoise = remask) and
`renoise` on a uniform-state process over the same network. Reported: seconds per call, best of --repeats runs; the
target is renoise <= 1.15x ancestral. Times are the process's CPU time (time.process_time, one thread), which other
jobs on a shared machine disturb less than wall time. What renoise adds per step: the entropy of every position's distribution,
a sort, a candidate draw at every position (ancestral draws only where it unmasks) and the prior's redraw.

Part 2, calls saved by adaptive stopping. A small MDLM trained on 4x4 Sudoku (experiments/sudoku's data and
`dlm train data.format=pairs`, --train-steps steps), then `renoise` on the test puzzles with StableAndConfident
stopping and without it (max_denoising_steps 48; without adaptive stopping an absorbing row still ends once no
[MASK] is left), the same seeds: puzzles solved, calls per puzzle, and the fraction of puzzles whose answers are
identical. Beside them the LLaDA sampler one cell per call and with the entropy-bound policy (EB-sampler).
With --uniform, the same on a uniform-state model (the test suite's plugin process, trained here on the same data),
where only adaptive stopping ends a row before max_denoising_steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = ", ".join(f for f in ("avx512f", "amx_tile", "avx2") if f" {f}" in text)
    except OSError:
        pass
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {cpu_name()} ({flags or 'no AVX flags read'}) | "
            f"{torch.get_num_threads()} threads | torch {torch.__version__} | float32")


def uniform_process(vocab: int):
    from dlm.process import ModelDescription
    from dlm.process.base import Process

    class Uniform(Process):  # the prior of a uniform-state process (no training here)
        name, corruption = "uniform_bench", "uniform"

    process = Uniform(mask_id=None)
    process.description = ModelDescription(vocab_size=vocab, d_model=128)
    return process


def part_cost(args) -> None:
    from dlm.config import ModelConfig
    from dlm.network import Transformer
    from dlm.process import MaskedDiffusion
    from dlm.process.schedules import LogLinearSchedule
    from dlm.sampler import Canvas
    from dlm.sampler.registry import make_sampler

    V, B, L, S = 300, args.batch, args.length, args.steps
    torch.manual_seed(0)
    net = Transformer(ModelConfig(n_layer=2, n_head=4, d_model=128, context=L, vocab_size=V)).eval()
    mdlm, uniform = MaskedDiffusion(LogLinearSchedule(1e-3), V - 1), uniform_process(V)
    runs = [("ancestral (MDLM)", make_sampler("ancestral", steps=S), mdlm),
            ("renoise (MDLM, remask)", make_sampler("renoise", max_denoising_steps=S, confidence_threshold=None), mdlm),
            ("renoise (uniform)", make_sampler("renoise", max_denoising_steps=S, confidence_threshold=None), uniform)]
    print(f"\nPart 1: cost per network call at equal NFE | {B} canvases x {L} positions, {S} steps, "
          f"network 2 x 128, V {V}")
    print(f"(CPU seconds of this process, best of {args.repeats} runs each, interleaved, after a warm-up)")
    print(f"{'sampler':26s} {'NFE':>5s} {'CPU s':>8s} {'ms/call':>8s} {'vs ancestral':>13s}")
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(B)]  # noqa: E731
    canvases = [Canvas.from_fixed(torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L, dtype=torch.bool), process,
                                  torch.Generator().manual_seed(0)) for _, _, process in runs]
    best, nfe = [float("inf")] * len(runs), [0] * len(runs)
    with torch.no_grad():
        for repeat in range(args.repeats + 1):  # the first round warms up
            for i, ((label, sampler, process), canvas) in enumerate(zip(runs, canvases)):
                start = time.process_time()  # this process's CPU time: other jobs on a shared machine count less
                out = sampler.sample(net, process, canvas, gens())
                if repeat:
                    best[i], nfe[i] = min(best[i], time.process_time() - start), out.nfe
    base = best[0] / nfe[0]
    for (label, _, _), seconds, calls in zip(runs, best, nfe):
        per = seconds / calls
        print(f"{label:26s} {calls:5d} {seconds:8.3f} {1000 * per:8.2f} {per / base:12.2f}x")


def part_stopping(args) -> None:
    sys.path.insert(0, str(REPO / "experiments" / "sudoku"))
    import run as sudoku  # experiments/sudoku/run.py

    import dlm
    from dlm.eval.tasks import evaluate_model
    from dlm.tasks import make_task

    out = Path(args.out or tempfile.mkdtemp(prefix="dlm-bench-renoise-"))
    scale = dict(sudoku.SCALES["full"], steps=args.train_steps, train=args.train_examples, test=args.puzzles,
                 model=["model.n_layer=2", "model.n_head=4", "model.d_model=128"], eval_n=args.puzzles)
    data = sudoku.write_data(scale, out)
    info = sudoku.train_run("mdlm", 0, scale, data, out)
    task_info = json.loads((data / "task.json").read_text())
    task = make_task(task_info["name"], **task_info["options"])
    examples = task.generate("test", task_info["sizes"]["test"], task_info["seed"])[:args.puzzles]
    model = dlm.load(info["run"])
    cells = scale["size"] ** 2 + 1
    rules = [("renoise, StableAndConfident", {"sampler": "renoise"}),
             ("renoise, no adaptive stopping", {"sampler": "renoise", "confidence_threshold": None}),
             ("llada, 1 cell per call (entropy order)", {"sampler": "llada", "remasking": "entropy", "steps": cells,
                                                         "temperature": 0.0}),
             ("llada, entropy bound 0.1", {"sampler": "llada", "remasking": "entropy", "entropy_bound": 0.1,
                                           "steps": cells, "temperature": 0.0})]
    print(f"\nPart 2: adaptive stopping on a trained Sudoku MDLM ({args.train_steps} training steps, "
          f"{info['train_seconds']:.0f} s; {len(examples)} test puzzles, 4x4, {cells} response positions)")
    print(f"{'decoding':40s} {'solved %':>9s} {'cells %':>8s} {'calls/puzzle':>13s} {'same answer %':>14s}")
    answers = {}
    for label, kw in rules:
        res = evaluate_model(model, task, examples, seed=0, batch_size=len(examples), **kw)
        answers[label] = res["responses"]
        ref = answers["renoise, no adaptive stopping"] if label.startswith("renoise") and \
            "renoise, no adaptive stopping" in answers else None
        same = "-" if ref is None else f"{100 * sum(a == b for a, b in zip(res['responses'], ref)) / len(ref):.1f}"
        print(f"{label:40s} {100 * res['solved']:9.1f} {100 * res['cell_accuracy']:8.1f} {res['nfe']:13.2f} "
              f"{same:>14s}")
    a, b = answers["renoise, StableAndConfident"], answers["renoise, no adaptive stopping"]
    print(f"renoise with vs without adaptive stopping: identical answers on "
          f"{100 * sum(x == y for x, y in zip(a, b)) / len(a):.1f} % of puzzles")
    if args.uniform:
        uniform_stopping(args, sudoku, scale, data, out, task, examples)


def uniform_stopping(args, sudoku, scale, data, out, task, examples) -> None:
    """The same comparison on a uniform-state model, where nothing else ends a row early: the test suite's
    uniform-state plugin process (tests/plugin_package/dlm_uniform_plugin.py: uniform corruption, x0 cross-entropy),
    trained in this process on the same data and steps."""
    import importlib.util

    import dlm
    from dlm.cli import main as dlm_main
    from dlm.eval.tasks import evaluate_model

    path = REPO / "tests" / "plugin_package" / "dlm_uniform_plugin.py"
    spec = importlib.util.spec_from_file_location("dlm_uniform_plugin", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["dlm_uniform_plugin"] = module
    spec.loader.exec_module(module)  # registers plugin_uniform_x0 and plugin_renoise
    run = out / "runs" / "uniform_s0"
    if not (run / "model" / "config.json").is_file():
        overrides = ["process=plugin_uniform_x0", *scale["model"], "data.format=pairs", f"data.source={data}",
                     f"trainer.max_steps={scale['steps']}", f"trainer.batch_size={scale['batch']}",
                     f"optim.lr={scale['lr']}", f"optim.warmup_steps={scale['warmup']}", "trainer.seed=0",
                     f"trainer.ema={scale['ema']}", f"trainer.val_every={scale['steps']}", "trainer.val_batches=2",
                     f"trainer.ckpt_every={scale['steps']}", f"trainer.out_dir={run}", "trainer.precision=32"]
        assert dlm_main(["train", *overrides, "--progress", "off"]) == 0
    model = dlm.load(str(run))
    print(f"\nUniform-state model (plugin_uniform_x0, {scale['steps']} training steps), renoise, "
          f"{len(examples)} test puzzles")
    print(f"{'decoding':40s} {'solved %':>9s} {'cells %':>8s} {'calls/puzzle':>13s} {'same answer %':>14s}")
    ref = None
    for label, kw in (("renoise, 48 steps, no adaptive stopping", {"confidence_threshold": None}),
                      ("renoise, StableAndConfident", {})):
        res = evaluate_model(model, task, examples, seed=0, batch_size=len(examples), sampler="renoise", **kw)
        same = "-" if ref is None else f"{100 * sum(x == y for x, y in zip(res['responses'], ref)) / len(ref):.1f}"
        ref = ref or res["responses"]
        print(f"{label:40s} {100 * res['solved']:9.1f} {100 * res['cell_accuracy']:8.1f} {res['nfe']:13.2f} "
              f"{same:>14s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("cost", "stopping", "both"), default="both")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--train-examples", type=int, default=5000)
    parser.add_argument("--puzzles", type=int, default=200)
    parser.add_argument("--uniform", action="store_true", help="part 2 also on a uniform-state model (trains one)")
    parser.add_argument("--out", default=None, help="folder for part 2's data and run (default: a temporary one)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    if args.part in ("cost", "both"):
        part_cost(args)
    if args.part in ("stopping", "both"):
        part_stopping(args)


if __name__ == "__main__":
    main()
