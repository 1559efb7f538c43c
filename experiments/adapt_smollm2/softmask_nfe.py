"""Step 4 of the SmolLM2 adaptation experiment: soft-masking vs plain masks at few network calls (NFE <= 32).

    python experiments/adapt_smollm2/softmask_nfe.py                        # the adapted model of train.sh
    python experiments/adapt_smollm2/softmask_nfe.py MODEL --quick          # a smoke run at toy sizes

For each step count (--steps, each <= 32) and each seed (--seeds), --num-samples unconditional samples of --length
tokens from the ancestral sampler (temperature 1), once with plain [MASK] inputs and once with soft-masking: the
model was not trained with SM, so SM is training-free with omega_s = --omega-s (omega_a, omega_b at their initial
values; experiments/softmask uses the same setting). Plain and SM runs of one seed share the random stream. Every
set is scored by Gemma 3 270M (generative perplexity, and the mean unigram entropy of Gemma token ids); the table
gives the mean over seeds with the spread (min-max), and the plot the same.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dlm  # noqa: E402
from measure import load_random_or, score  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="runs/adapt_smollm2/smollm2-mdlm")
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 16, 31],
                        help="step counts; the ancestral sampler adds one call when masks are left at the end, "
                             "so 31 steps make at most 32 network calls")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--omega-s", type=float, default=0.5)
    parser.add_argument("--eval-model", default="gemma3")
    parser.add_argument("--out", default=None, help="results JSON (default MODEL/../softmask_nfe.json)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.num_samples, args.length = [4], [0, 1], 2, 16
        args.runs = str(Path(args.model).parent)
    out = Path(args.out or Path(args.model).parent / "softmask_nfe.json")
    results = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    model = dlm.load(args.model)
    eval_lm = load_random_or(args)
    results["setup"] = {"model": args.model, "steps": model.trained_steps, "omega_s": args.omega_s,
                        "num_samples": args.num_samples, "length": args.length, "seeds": args.seeds,
                        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "eval_model": eval_lm.name}
    for steps in args.steps:
        for seed in args.seeds:
            for sm in (False, True):
                key = f"{steps}/{seed}/{'sm' if sm else 'plain'}"
                if key in results["rows"]:
                    continue
                t0 = time.perf_counter()
                with torch.inference_mode():
                    gen = model.generate(num_samples=args.num_samples, length=args.length, sampler="ancestral",
                                         steps=steps, seed=seed, batch_size=args.num_samples,
                                         softmask={"omega_s": args.omega_s} if sm else False)
                row = {"nfe": gen.nfe, "seconds": time.perf_counter() - t0, "texts": gen.texts,
                       **score(gen.texts, eval_lm)}
                results["rows"][key] = row
                out.write_text(json.dumps(results, indent=1))
                print(f"steps {steps} seed {seed} {'SM   ' if sm else 'plain'}: NFE {gen.nfe}, gen ppl "
                      f"{row['gen_ppl']:.1f}, entropy {row['entropy']:.3f} ({row['seconds']:.0f} s)", flush=True)
    print(summary(results))
    print(f"written: {out}")
    return 0


def summary(results: dict) -> str:
    """Markdown table: per step count and variant, mean gen. ppl (min-max over seeds) and mean entropy."""
    lines = ["| steps (NFE) | variant | gen. ppl, mean (min-max over seeds) | entropy, mean (min-max) |",
             "|---:|---|---|---|"]
    for steps, variant, rows in grouped(results):
        ppl = [r["gen_ppl"] for r in rows]
        ent = [r["entropy"] for r in rows]
        lines.append(f"| {steps} ({max(r['nfe'] for r in rows)}) | {variant} | {statistics.mean(ppl):.1f} "
                     f"({min(ppl):.1f}-{max(ppl):.1f}) | {statistics.mean(ent):.3f} ({min(ent):.3f}-{max(ent):.3f}) |")
    return "\n".join(lines)


def grouped(results: dict):
    """(steps, variant, rows over seeds) in step order, plain first."""
    keys = {}
    for key, row in results["rows"].items():
        steps, _, variant = key.split("/")
        keys.setdefault((int(steps), variant), []).append(row)
    for (steps, variant) in sorted(keys, key=lambda k: (k[0], k[1] != "plain")):
        yield steps, "soft-masking (training-free)" if variant == "sm" else "plain", keys[(steps, variant)]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = {}
    for steps, variant, rows in grouped(results):
        ppl = [r["gen_ppl"] for r in rows]
        series.setdefault(variant, []).append((steps, statistics.mean(ppl), min(ppl), max(ppl)))
    for shift, (variant, points) in zip((0.97, 1.03), series.items()):  # side by side, so the bars do not overlap
        x, mean, lo, hi = zip(*points)
        ax.errorbar([v * shift for v in x], mean, yerr=[[m - a for m, a in zip(mean, lo)], [b - m for m, b in zip(mean, hi)]],
                    marker="o", capsize=4, label=variant)
    setup = results["setup"]
    ax.set(xscale="log", xlabel="sampling steps (network calls)", ylabel="generative perplexity (lower is better)",
           title=f"{Path(setup['model']).name}: {setup['num_samples']} x {len(setup['seeds'])} samples per point, "
                 f"{setup['length']} tokens\nevaluator {setup['eval_model'].split(' (')[0]}; bars: min-max over seeds")
    ax.title.set_fontsize(8)
    ax.set_xticks(sorted({p[0] for pts in series.values() for p in pts}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
