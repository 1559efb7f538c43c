"""Sudoku: what decoding order, parallel decoding, soft-masking and remasking buy, measured with exact answers
(issue 20; Kim, Shah et al., "Train for the Worst, Plan for the Best", arXiv 2502.06768).

    python experiments/sudoku/run.py                       # full run: docs/sudoku.md and docs/sudoku.png
    python experiments/sudoku/run.py --quick --out DIR     # a minute: the same pipeline at toy scale

Protocol. One board size, one data set (dlm.tasks.sudoku: train / validation / test disjoint by solution grid), one
network size, one optimiser. Every method is trained by `dlm train data.format=pairs` (SFT: the puzzle is given,
never noised, never scored; the solution and its EOS are the response) for the same number of optimizer steps on
the same batches (equal training compute, except soft-masking's second pass, reported beside it), with 2 seeds:
  mdlm   masked diffusion (MDLM)                 ar     autoregressive, the same network, left to right
  bd3lm  block diffusion, one block per board row  sm   MDLM + soft-masking training
  esolm_b1, esolm_b05, esolm_b025   Eso-LM with causal attention on the sorted sequence (the paper's (B)) at
         alpha0 = 1, 0.5, 0.25;  esolm_a1   Eso-LM with clean tokens bidirectional (the paper's (A)) at alpha0 = 1
         (decoded by the same LLaDA-style and threshold rules, and by the esolm sampler)
  sedd_absorb   SEDD, absorbing graph, log-linear noise (docs/sedd.md)
  sedd_uniform  SEDD, uniform graph, geometric noise, time-conditioned network
  udlm, udlm_sc, gidd   uniform-state ELBO without / with self-conditioning, GIDD's mask/uniform mix (docs/uniform.md)
The default --methods are the first four (docs/sudoku.md as published); the others are run on request (the issue-21
and issue-22 experiments, experiments/uniform_vs_masked and experiments/esolm, do).
Each model then solves the same test puzzles with each decoding rule below; every rule reports puzzles solved,
cells correct, rule violations and network calls per puzzle (NFE):
  - the LLaDA-style sampler with one block over the board, committing k = 1, 2, 4, 8 cells per call (count
    schedule), in random order, by top probability, by top-1 minus top-2 margin, by lowest entropy;
  - threshold decoding (Fast-dLLM): every cell whose top probability is above tau, at least one per call;
  - the entropy bound (EB-sampler: commit the lowest-entropy cells while their entropies, less the largest, sum to at
    most 0.1), and DiffusionGemma's renoising sampler (`renoise`: renoise = remask on these absorbing models) with
    adaptive stopping, reporting the calls it chose;
  - MDLM's ancestral sampler (random order with the schedule's random counts), and ReMDM remasking;
  - AR: greedy left to right; BD3-LM: block by block (one board row per block), its ancestral sampler inside;
  - Eso-LM: also its own sampler (`esolm`): k cells per call over the diffusion share, then left to right;
  - SEDD: the score samplers (Tweedie and Euler) at 17 and 9 steps; SEDD-absorbing also MDLM's ancestral sampler;
  - UDLM / GIDD: the ancestral posterior (`uniform_ancestral`) at 17, 9, 5, 3 steps; every model not AR also the
    renoising sampler with adaptive stopping.
Tokens are argmaxes (temperature 0) except for the ancestral and ReMDM samplers, which draw (their definition).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[2]
METHODS = ("mdlm", "ar", "bd3lm", "sm", "esolm_b1", "esolm_b05", "esolm_b025", "esolm_a1", "sedd_absorb",
           "sedd_uniform", "udlm", "udlm_sc", "gidd")
# Eso-LM (process=esolm, docs/esolm.md): "b" = attention "causal" (the paper's Eso-LM (B)), "a" = attention
# "clean_bidirectional" (Eso-LM (A)); the digits are alpha0 (1, 0.5, 0.25).
ESOLM = {"esolm_b1": ("causal", "1.0"), "esolm_b05": ("causal", "0.5"), "esolm_b025": ("causal", "0.25"),
         "esolm_a1": ("clean_bidirectional", "1.0")}
DEFAULT_METHODS = ("mdlm", "ar", "bd3lm", "sm")  # the published run (docs/sudoku.md); the others on request
ORDERS = {"random": "random", "top-prob": "low_confidence", "margin": "margin", "entropy": "entropy"}

SCALES = {
    "full": {"size": 4, "givens": 6, "train": 20000, "val": 200, "test": 500, "steps": 1200, "batch": 64,
             "lr": 1e-3, "warmup": 100, "model": ["model.n_layer=4", "model.n_head=4", "model.d_model=128"],
             "seeds": (0, 1), "ks": (1, 2, 4, 8), "thresholds": (0.999, 0.99, 0.9, 0.7), "ema": 0.99, "eval_n": 250},
    "quick": {"size": 4, "givens": 6, "train": 300, "val": 20, "test": 24, "steps": 6, "batch": 8,
              "lr": 1e-3, "warmup": 1, "model": ["model.n_layer=1", "model.n_head=2", "model.d_model=32"],
              "seeds": (0,), "ks": (1, 8), "thresholds": (0.9,), "ema": 0.0, "eval_n": 24},
}


def write_data(scale: dict, out: Path) -> Path:
    """The task folder (train/validation/test.jsonl + task.json), written once."""
    folder = out / "data"
    if not (folder / "task.json").is_file():
        from dlm.tasks.sudoku import main as sudoku_main

        sudoku_main(["--size", str(scale["size"]), "--givens", str(scale["givens"]), "--train", str(scale["train"]),
                     "--val", str(scale["val"]), "--test", str(scale["test"]), "--seed", "0", "--out", str(folder)])
    return folder


def method_overrides(method: str, size: int) -> list[str]:
    if method in ESOLM:
        attention, alpha0 = ESOLM[method]
        return ["process=esolm", f"process.attention={attention}", f"process.alpha0={alpha0}"]
    return {"mdlm": ["process=mdlm"], "ar": ["process=ar"], "sm": ["process=mdlm", "softmask.enabled=true"],
            "bd3lm": ["process=bd3lm", f"process.block_size={size}"],
            "sedd_absorb": ["process=sedd", "process.graph=absorbing", "process.noise=loglinear"],
            "sedd_uniform": ["process=sedd", "process.graph=uniform", "process.noise=geometric",
                             "model.time_conditioning=true"], "udlm": ["process=udlm"],
            "udlm_sc": ["process=udlm", "process.self_conditioning=0.5"],
            "gidd": ["process=gidd", "process.p_u=0.2"]}[method]


def train_run(method: str, seed: int, scale: dict, data: Path, out: Path) -> dict:
    """Train one (method, seed) with `dlm train` in a child process (reused when finished earlier)."""
    run = out / "runs" / f"{method}_s{seed}"
    timing = run / "train_seconds.txt"
    if (run / "model" / "config.json").is_file() and timing.is_file():
        return {"run": str(run), "train_seconds": float(timing.read_text())}
    overrides = [*method_overrides(method, scale["size"]), *scale["model"], "data.format=pairs",
                 f"data.source={data}", f"trainer.max_steps={scale['steps']}", f"trainer.batch_size={scale['batch']}",
                 f"optim.lr={scale['lr']}", f"optim.warmup_steps={scale['warmup']}", f"trainer.seed={seed}",
                 f"trainer.ema={scale['ema']}", f"trainer.val_every={scale['steps']}", "trainer.val_batches=2",
                 f"trainer.ckpt_every={scale['steps']}", f"trainer.out_dir={run}", "trainer.precision=32"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dlm.cli", "train", *overrides, "--progress", "off"], check=True,
                   cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    timing.write_text(f"{time.perf_counter() - start:.1f}")
    return {"run": str(run), "train_seconds": float(timing.read_text())}


def decoders(method: str, cells: int, scale: dict) -> list[dict]:
    """The decoding rules a method is evaluated with: {label, order, k, generate: the keywords of
    `DiffusionLM.generate` (sampler and its options)}. `cells`: the response's positions (board cells + EOS)."""
    if method == "ar":
        return [{"label": "left to right", "order": "left-to-right", "k": 1,
                 "generate": {"sampler": "autoregressive", "temperature": 0.0}}]
    if method == "bd3lm":  # block by block (the blockwise sampler), ancestral inside a block
        size = int(round(math.sqrt(cells - 1)))
        blocks = math.ceil(cells / size) + 1  # the response straddles one more block than it fills
        return [{"label": f"blocks of {size}, {steps} steps", "order": "blockwise", "k": cells / steps,
                 "generate": {"sampler": "ancestral_cache", "steps": steps}}
                for steps in sorted({cells, 2 * blocks, blocks}, reverse=True)] + [
                {"label": f"blocks of {size}, renoise, adaptive stopping", "order": "blockwise", "k": None,
                 "generate": {"sampler": "renoise"}}]
    if method in ("udlm", "udlm_sc", "gidd"):  # uniform or mixed noise: the ancestral posterior (docs/uniform.md)
        return [{"label": f"posterior, {steps} steps", "order": "ancestral", "k": cells / steps,
                 "generate": {"sampler": "uniform_ancestral", "steps": steps}}  # self-conditioning fed by default
                for steps in sorted({math.ceil(cells / k) for k in scale["ks"]}, reverse=True)] + ([
                {"label": "renoise, adaptive stopping", "order": "renoise", "k": None,
                 "generate": {"sampler": "renoise"}}] if method != "gidd" else [])  # renoise: not a mixed process
    out = []
    if method.startswith("sedd"):  # the score samplers (docs/sedd.md); absorbing also MDLM's ancestral sampler
        for k in scale["ks"][:2]:
            steps = math.ceil(cells / k)
            for name in ("tweedie", "euler"):
                out.append({"label": f"{name}, {steps} steps", "order": "score", "k": k,
                            "generate": {"sampler": name, "steps": steps}})
            if method == "sedd_absorb":
                out.append({"label": f"ancestral, {steps} steps", "order": "ancestral", "k": k,
                            "generate": {"sampler": "ancestral", "steps": steps}})
        return out + [{"label": "renoise, adaptive stopping", "order": "renoise", "k": None,
                       "generate": {"sampler": "renoise"}}]
    for order, remasking in ORDERS.items():
        for k in scale["ks"]:
            out.append({"label": f"{order}, k={k}", "order": order, "k": k,
                        "generate": {"sampler": "llada", "remasking": remasking, "steps": math.ceil(cells / k),
                                     "temperature": 0.0}})
    for tau in scale["thresholds"]:
        out.append({"label": f"threshold {tau}", "order": "top-prob", "k": None,
                    "generate": {"sampler": "llada", "remasking": "low_confidence", "threshold": tau,
                                 "steps": cells, "temperature": 0.0}})
    if method in ESOLM:  # Eso-LM's own sampler: diffusion sets (k cells per call), then left to right, greedy
        for k in scale["ks"]:
            schedule = {"schedule": "first_hitting"} if k == 1 else {"schedule": "fixed", "parallelism": k}
            out.append({"label": f"esolm sampler, k={k}", "order": "esolm", "k": k,
                        "generate": {"sampler": "esolm", **schedule, "temperature": 0.0}})
    # the entropy bound (EB-sampler): as a commit policy of the LLaDA sampler, and DiffusionGemma's renoising sampler
    # (for an absorbing model renoise = remask) with its adaptive stopping: the NFE it chose is the row's `nfe`
    out.append({"label": "entropy bound 0.1", "order": "entropy", "k": None,
                "generate": {"sampler": "llada", "remasking": "entropy", "entropy_bound": 0.1, "steps": cells,
                             "temperature": 0.0}})
    out.append({"label": "renoise, adaptive stopping", "order": "renoise", "k": None,
                "generate": {"sampler": "renoise"}})
    if method == "mdlm":
        for k in scale["ks"][:2]:
            out.append({"label": f"ancestral, {math.ceil(cells / k)} steps", "order": "ancestral", "k": k,
                        "generate": {"sampler": "ancestral", "steps": math.ceil(cells / k)}})
        out.append({"label": f"ReMDM (loop), {2 * cells} steps", "order": "remdm", "k": None,
                    "generate": {"sampler": "remdm_loop", "steps": 2 * cells}})
    return out


def evaluate_run(method: str, seed: int, info: dict, data: Path, scale: dict, done: set = frozenset()) -> list[dict]:
    """Every decoding rule of `method` on the test puzzles, through the generation door (`evaluate_model`, i.e.
    `DiffusionLM.generate`: what a user runs); the soft-masking model with its learned feedback. `done`: labels
    already in the results (skipped: a re-run evaluates only the rules added since)."""
    import dlm
    from dlm.eval.tasks import evaluate_model
    from dlm.tasks import make_task

    task_info = json.loads((data / "task.json").read_text())
    task = make_task(task_info["name"], **task_info["options"])
    # the test split again from its generator (a pure function of split, n, seed): test.jsonl's puzzles, with
    # each one's search difficulty (`nodes`) for the hardest-quarter metric
    examples = task.generate("test", task_info["sizes"]["test"], task_info["seed"])[:scale["eval_n"]]
    model = dlm.load(info["run"])
    cells = scale["size"] ** 2 + 1
    rows = []
    for dec in decoders(method, cells, scale):
        if dec["label"] in done:
            continue
        kw = dict(dec["generate"], softmask=True) if method == "sm" else dec["generate"]
        result = evaluate_model(model, task, examples, seed=seed, batch_size=250, **kw)
        rows.append({"method": method, "seed": seed, **{k: dec[k] for k in ("label", "order", "k", "generate")},
                     **{k: result[k] for k in ("solved", "cell_accuracy", "blank_accuracy", "violations", "nfe",
                                               "tokens_per_second", "n", "hardest_solved")},
                     "train_seconds": info["train_seconds"]})
        print(f"{method} s{seed} {dec['label']:<32} solved {result['solved']:.3f} cells "
              f"{result['cell_accuracy']:.3f} nfe {result['nfe']:.1f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="toy scale (seconds), for the tests")
    p.add_argument("--out", default=str(REPO / "experiments" / "sudoku" / "out"), help="working folder")
    p.add_argument("--docs", default=None, help="where sudoku.md and sudoku.png go (default: docs/, or --out "
                   "with --quick)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="a subset of the scale's seeds")
    p.add_argument("--train-only", action="store_true", help="train every run, evaluate nothing")
    p.add_argument("--eval-only", action="store_true", help="evaluate the runs already trained, train nothing")
    args = p.parse_args(argv)
    scale = SCALES["quick" if args.quick else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = write_data(scale, out)
    results_path = out / "results.jsonl"
    done = {(r["method"], r["seed"], r["label"]) for r in map(json.loads, results_path.read_text().splitlines())} \
        if results_path.is_file() else set()
    for method in args.methods:
        for seed in args.seeds or scale["seeds"]:
            labels = {label for m, s, label in done if (m, s) == (method, seed)}
            cells = scale["size"] ** 2 + 1
            if labels >= {d["label"] for d in decoders(method, cells, scale)}:
                continue
            run = out / "runs" / f"{method}_s{seed}"
            if args.eval_only and not (run / "train_seconds.txt").is_file():
                continue
            info = train_run(method, seed, scale, data, out)
            if args.train_only:
                continue
            rows = evaluate_run(method, seed, info, data, scale, labels)
            with results_path.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    if args.train_only:
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import write_report  # experiments/sudoku/report.py

    results = [json.loads(line) for line in results_path.read_text().splitlines()]
    docs = Path(args.docs) if args.docs else (out if args.quick else REPO / "docs")
    md, png = write_report(results, scale, args, docs)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
