"""Uniform-state vs masked diffusion (issue 21): MDLM, SEDD (absorbing and uniform graphs), the uniform-state ELBO
without and with self-conditioning and GIDD's mask/uniform mix, at equal training steps, on the embedded corpus
and on the Sudoku task.

    python experiments/uniform_vs_masked/run.py                   # full: docs/uniform_vs_masked.md + .png
    python experiments/uniform_vs_masked/run.py --quick --work D  # seconds: the same pipeline at toy scale

Corpus. Every method trains the same network (model overrides below) on the same batches (the step's batch is a
pure function of seed and step) for the same number of optimizer steps, 2 seeds; a self-conditioned model pays a
first pass on a fraction p of its batches (reported). Then, per (method, seed):
  - the perplexity bound of the validation split (each process's own `nelbo`: a continuous-time bound for every
    method here, so the numbers are comparable upper bounds);
  - unconditional samples at NFE 8 / 32 / 128 with each model's own samplers (MDLM: ancestral and the score
    sampler tweedie; SEDD: tweedie and euler, SEDD-absorbing also MDLM's ancestral; uniform models: the uniform
    ancestral sampler), and DiffusionGemma's renoising sampler with adaptive stopping (StableAndConfident) at a
    budget of 128 steps, which reports the NFE it chose; scored by generative perplexity under SmolLM2-135M and
    unigram entropy (experiments/softmask/scoring.py).
Sudoku. experiments/sudoku/run.py trains and evaluates the same methods on 4x4 puzzles (it reuses its MDLM runs);
the table here quotes its puzzles-solved figures per sampler and NFE.
Every stage is cached in --work (runs/, results.jsonl): re-running resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `experiments.*` imports when run as a script
from experiments.softmask.run import train_run  # noqa: E402  (train or reuse one run folder)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# method -> (process overrides, the samplers it is sampled with besides renoise)
METHODS = {
    "mdlm": (["process=mdlm"], ("ancestral", "tweedie")),
    "sedd_absorb": (["process=sedd", "process.graph=absorbing", "process.noise=loglinear"],
                    ("tweedie", "euler", "ancestral")),
    "sedd_uniform": (["process=sedd", "process.graph=uniform", "process.noise=geometric",
                      "model.time_conditioning=true"], ("tweedie", "euler")),
    "udlm": (["process=udlm"], ("uniform_ancestral",)),
    "udlm_sc": (["process=udlm", "process.self_conditioning=0.5"], ("uniform_ancestral",)),
    "gidd": (["process=gidd", "process.p_u=0.2"], ("uniform_ancestral",)),
}
SUDOKU_METHODS = ("mdlm", "sedd_absorb", "sedd_uniform", "udlm", "udlm_sc", "gidd")


@dataclass
class Sizes:
    model: list[str]
    steps: int
    lr: float
    batch: int
    seeds: tuple[int, ...]
    nfe: tuple[int, ...]
    num_samples: int
    ppl_rows: int
    ppl_t: int


FULL = Sizes(model=["model.n_layer=2", "model.n_head=4", "model.d_model=128", "model.context=64",
                    "data.vocab_size=2048"],
             steps=500, lr=1e-3, batch=32, seeds=(0, 1), nfe=(8, 32, 128), num_samples=16, ppl_rows=64, ppl_t=8)
QUICK = Sizes(model=["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.context=32",
                     "data.vocab_size=300"],
              steps=4, lr=1e-3, batch=4, seeds=(0,), nfe=(4,), num_samples=4, ppl_rows=4, ppl_t=1)


def training_stage(args, sizes: Sizes, work: Path, methods: dict = METHODS) -> dict:
    """Every (method, seed) of args.methods trained (or reused) with `methods`' overrides: {(method, seed): (folder,
    train seconds)}."""
    common = [*sizes.model, f"trainer.batch_size={sizes.batch}", "trainer.progress=false", "trainer.val_batches=0",
              "trainer.ema=0.99" if not args.quick else "trainer.ema=0", f"data.source={args.data}",
              f"trainer.max_steps={sizes.steps}", f"optim.lr={sizes.lr}", "optim.decay=cosine",
              f"optim.warmup_steps={max(1, sizes.steps // 10)}", f"trainer.ckpt_every={max(1, sizes.steps // 2)}"]
    runs = {}
    for method in args.methods:
        for seed in sizes.seeds:
            runs[(method, seed)] = train_run(work / "runs" / f"{method}_s{seed}",
                                             [*common, *methods[method][0], f"trainer.seed={seed}"])
    return runs


def evaluation_stage(args, sizes: Sizes, runs: dict, work: Path) -> list[dict]:
    import dlm
    from dlm.eval.reference import human_reference
    from experiments.softmask.scoring import random_eval_lm, sample_metrics, score_texts

    results_path = work / "results.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    have = {r["key"] for r in done}

    def record(row: dict) -> None:
        done.append(row)
        with open(results_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "texts"}, flush=True)

    first = dlm.load(next(iter(runs.values()))[0])
    length = first.context
    if args.quick:
        eval_lm = random_eval_lm(first.tokenizer, first.network.cfg.vocab_size, first.context)
    else:
        from dlm.eval.genppl import EvalLM

        eval_lm = EvalLM.smollm2()
    ref_feats = score_texts(human_reference(first, sizes.num_samples, length, args.data, "test"), eval_lm)["features"]
    for (method, seed), (path, seconds) in runs.items():
        model = None
        key = f"ppl/{method}/{seed}"
        if key not in have:
            model = dlm.load(path)
            p = model.perplexity(source=args.data, split="val", num_t_samples=sizes.ppl_t, max_rows=sizes.ppl_rows)
            record({"key": key, "method": method, "seed": seed, "val_ppl": p["ppl"], "bound": p.get("likelihood"),
                    "train_seconds": seconds})
        settings = [(s, n, {"steps": n}) for s in METHODS[method][1] for n in sizes.nfe]
        if method != "gidd":  # renoise serves uniform and absorbing corruption, not GIDD's mix of both
            settings.append(("renoise", max(sizes.nfe), {"max_denoising_steps": max(sizes.nfe)}))
        for sampler, budget, options in settings:
            key = f"gen/{method}/{seed}/{sampler}/{budget}"
            if key in have:
                continue
            model = model or dlm.load(path)
            t0 = time.perf_counter()
            gen = model.generate(num_samples=sizes.num_samples, length=length, sampler=sampler, seed=10_000 + seed,
                                 batch_size=sizes.num_samples, **options)
            nfe_rows = getattr(gen, "nfe_per_row", None)
            row = {"key": key, "method": method, "seed": seed, "sampler": sampler, "budget": budget, "nfe": gen.nfe,
                   "nfe_mean_row": float(sum(nfe_rows) / len(nfe_rows)) if nfe_rows is not None else float(gen.nfe),
                   "sample_seconds": time.perf_counter() - t0,
                   **sample_metrics(gen.texts, gen.tokens.tolist(), eval_lm, ref_feats), "texts": gen.texts[:2]}
            record(row)
    return done


def sudoku_stage(args, methods: tuple[str, ...] = SUDOKU_METHODS) -> list[dict]:
    """experiments/sudoku/run.py on the same methods (its own folder, its own docs page), then its rows."""
    cmd = [sys.executable, str(ROOT / "experiments" / "sudoku" / "run.py"), "--out", args.sudoku_out,
           "--methods", *[m for m in methods if m in args.methods]]
    if args.quick:
        cmd += ["--quick", "--docs", str(Path(args.sudoku_out))]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    path = Path(args.sudoku_out) / "results.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["method"] in args.methods]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes, random evaluator: a smoke test")
    parser.add_argument("--work", default=None, help="runs and cached results (default: runs/uniform_vs_masked)")
    parser.add_argument("--out", default=None, help="where the page and plot go (default: docs/, or WORK with --quick)")
    parser.add_argument("--data", default="embedded", help="the text source (default: the embedded corpus)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--sudoku-out", default=None, help="experiments/sudoku/run.py's folder (default: WORK/sudoku)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["corpus", "sudoku"], help="stages to leave out")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    work = Path(args.work or (ROOT / "runs" / "uniform_vs_masked"))
    work.mkdir(parents=True, exist_ok=True)
    args.sudoku_out = args.sudoku_out or str(work / "sudoku")
    if args.quick and args.data == "embedded":
        from experiments.softmask.run import quick_corpus

        args.data = quick_corpus(work / "corpus")
    corpus = [] if "corpus" in args.skip else evaluation_stage(args, sizes, training_stage(args, sizes, work), work)
    sudoku = [] if "sudoku" in args.skip else sudoku_stage(args)
    from experiments.uniform_vs_masked.report import write_report

    out = Path(args.out) if args.out else (work if args.quick else ROOT / "docs")
    md, png = write_report(corpus, sudoku, sizes, args, out)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
