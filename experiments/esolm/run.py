"""Eso-LM (issue 22): MDLM, AR, BD3-LM (block 4) and Eso-LM at alpha0 in {1, 0.5, 0.25, 0.125} with causal
attention on the sorted sequence (Eso-LM (B), the published model) plus clean-bidirectional attention (Eso-LM (A))
at alpha0 = 1, at equal training steps, on the embedded corpus and on the Sudoku task.

    python experiments/esolm/run.py                    # full: docs/esolm_experiment.md + .png
    python experiments/esolm/run.py --quick --work D   # seconds: the same pipeline at toy scale

Corpus. Every method trains the same network on the same batches for the same number of optimizer steps, 2 seeds.
Then, per (method, seed):
  - the perplexity bound of the validation split (each process's `nelbo`; AR: exact), and for MDLM and Eso-LM the
    K-order importance-weighted any-order estimate (`perplexity(iw_orders=K)`, an estimate of the exact likelihood
    that falls towards it as K grows; docs/esolm.md);
  - unconditional samples at NFE 8 / 32 / 128 (MDLM: ancestral; BD3-LM: its blockwise sampler; Eso-LM: its own
    sampler with the binomial schedule at alpha0_eval = alpha0; AR: left to right, NFE = length), scored by
    generative perplexity under SmolLM2-135M and unigram entropy (experiments/softmask/scoring.py).
Latency at 512 / 2,048 / 8,192 tokens is bench/esolm_latency.py (a randomly initialised network is enough for speed).
Sudoku. experiments/sudoku/run.py trains and evaluates the Eso-LM methods on 4x4 puzzles (it reuses its MDLM, AR
and BD3-LM runs); the table here quotes its puzzles-solved figures.
Every stage is cached in --work (runs/, results.jsonl): re-running resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `experiments.*` imports when run as a script
# the sizes, training and Sudoku stages are the uniform-vs-masked experiment's, with this experiment's methods
from experiments.uniform_vs_masked.run import FULL, QUICK, Sizes, sudoku_stage, training_stage  # noqa: E402
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# method -> (process overrides, the samplers it is sampled with)
METHODS = {
    "mdlm": (["process=mdlm"], ("ancestral",)),
    "ar": (["process=ar"], ("autoregressive",)),
    "bd3lm": (["process=bd3lm", "process.block_size=4"], ("ancestral_cache",)),
    "esolm_b1": (["process=esolm", "process.alpha0=1.0"], ("esolm",)),
    "esolm_b05": (["process=esolm", "process.alpha0=0.5"], ("esolm",)),
    "esolm_b025": (["process=esolm", "process.alpha0=0.25"], ("esolm",)),
    "esolm_b0125": (["process=esolm", "process.alpha0=0.125"], ("esolm",)),
    "esolm_a1": (["process=esolm", "process.alpha0=1.0", "process.attention=clean_bidirectional"], ("esolm",)),
}
SUDOKU_METHODS = ("esolm_b1", "esolm_b05", "esolm_b025", "esolm_a1")
IW_ORDERS = 8


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
            iw = IW_ORDERS if method == "mdlm" or method.startswith("esolm") else 0
            p = model.perplexity(source=args.data, split="val", num_t_samples=sizes.ppl_t, max_rows=sizes.ppl_rows,
                                 iw_orders=iw if not args.quick else min(iw, 2))
            record({"key": key, "method": method, "seed": seed, "val_ppl": p["ppl"], "bound": p.get("likelihood"),
                    "iw_ppl": p.get("iw_ppl"), "ao_ppl": p.get("ao_ppl"), "train_seconds": seconds})
        if method == "ar":  # left to right: one call per token
            settings = [("autoregressive", length, {})]
        else:  # BD3-LM spends at least one step per block of 4
            budgets = sorted({max(n, length // 4) if method == "bd3lm" else n for n in sizes.nfe})
            settings = [(s, n, {"steps": n}) for s in METHODS[method][1] for n in budgets]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes, random evaluator: a smoke test")
    parser.add_argument("--work", default=None, help="runs and cached results (default: runs/esolm)")
    parser.add_argument("--out", default=None, help="where the page and plot go (default: docs/, or WORK with --quick)")
    parser.add_argument("--data", default="embedded", help="the text source (default: the embedded corpus)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--sudoku-out", default=None, help="experiments/sudoku/run.py's folder (default: WORK/sudoku)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["corpus", "sudoku"], help="stages to leave out")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    work = Path(args.work or (ROOT / "runs" / "esolm"))
    work.mkdir(parents=True, exist_ok=True)
    args.sudoku_out = args.sudoku_out or str(work / "sudoku")
    if args.quick and args.data == "embedded":
        from experiments.softmask.run import quick_corpus

        args.data = quick_corpus(work / "corpus")
    corpus = [] if "corpus" in args.skip else evaluation_stage(args, sizes, training_stage(args, sizes, work, METHODS), work)
    sudoku = [] if "sudoku" in args.skip else sudoku_stage(args, SUDOKU_METHODS)
    from experiments.esolm.report import write_report

    out = Path(args.out) if args.out else (work if args.quick else ROOT / "docs")
    md, png = write_report(corpus, sudoku, sizes, args, out)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
