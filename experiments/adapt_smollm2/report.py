"""Step 5 of the SmolLM2 adaptation experiment: plots for docs/ and the tables of docs/adapt_smollm2.md, printed.

    python experiments/adapt_smollm2/report.py        # reads runs/adapt_smollm2/{eval,softmask_nfe}.json and the logs

Writes docs/adapt_smollm2_curves.png (validation bits per byte against training minutes, both runs) and
docs/adapt_smollm2_softmask.png (soft-masking vs plain against NFE), and prints the markdown tables and samples.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from softmask_nfe import plot as plot_softmask, summary  # noqa: E402

RUNS = {"tiny MDLM, from scratch": ("tiny-mdlm", 32 * 128), "SmolLM2 -> MDLM, full": ("smollm2-mdlm", 8 * 128)}


def curve(run: Path, batch_tokens: int, minutes: float) -> tuple[list[float], list[float], list[int]]:
    """(training minutes, val NLL per token, step) of a run's validations; minutes from the logged step throughput,
    scaled so that the last step lands on the run's total training minutes."""
    elapsed, t, points = {}, 0.0, []
    for part in sorted((run / "logs").glob("part-*/metrics.csv")):
        for row in csv.DictReader(open(part)):
            step = int(row["step"])
            if row.get("train/tokens_per_s"):
                t += batch_tokens / float(row["train/tokens_per_s"])
                elapsed[step] = t
            if row.get("val/nll"):
                points.append((step, float(row["val/nll"])))
    scale = minutes / t if t else 0.0
    steps = sorted(elapsed)
    at = lambda s: elapsed[max([k for k in steps if k <= s] or [steps[0]])] * scale  # noqa: E731
    return [at(s) for s, _ in points], [v for _, v in points], [s for s, _ in points]


def plot_curves(runs: Path, ev: dict, minutes: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, (folder, batch_tokens) in RUNS.items():
        tpb = ev["models"][name]["likelihood"]["tokens_per_byte"]
        x, nll, steps = curve(runs / folder, batch_tokens, minutes)
        ax.plot(x, [v * tpb / math.log(2) for v in nll], marker="o", ms=3, label=f"{name} ({steps[-1] + 1} steps)")
    ar = ev["models"]["SmolLM2-135M (AR, exact)"]["likelihood"]["bits_per_byte"]
    ax.axhline(ar, color="grey", ls=":", label=f"SmolLM2-135M itself, AR exact ({ar:.2f})")
    ax.set(xlabel="training minutes (1 CPU thread each, same machine, at the same time)",
           ylabel="validation bits per byte (MDLM: bound)",
           title="Adapting SmolLM2-135M vs training a tiny MDLM from scratch, equal wall-clock")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def likelihood_table(ev: dict) -> str:
    lines = ["| model | parameters | trained steps | tokens | NLL / token (nats) | bits / byte |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in ev["models"].items():
        lk = row["likelihood"]
        kind = "bound" if lk["bound"] else "exact"
        lines.append(f"| {name} | {row['params'] / 1e6:.1f}M | {row['steps'] if row['steps'] is not None else '-'} "
                     f"| {lk['tokens']:,} | {lk['nll_per_token']:.3f} ({kind}) | **{lk['bits_per_byte']:.3f}** |")
    return "\n".join(lines)


def samples_table(ev: dict) -> str:
    lines = ["| model | sampler | network calls (16 samples, 2 batches of 8) | gen. ppl (Gemma 3 270M) "
             "| entropy (Gemma tokens) | seconds |",
             "|---|---|---:|---:|---:|---:|"]
    for name, row in ev["models"].items():
        s, sc = row["samples"], row["score"]
        sampler = "left to right" if "AR" in name else "ancestral + DDPM cache"
        lines.append(f"| {name} | {sampler} | {s['nfe']} | {sc['gen_ppl']:.1f} | {sc['entropy']:.3f} "
                     f"| {s['seconds']:.0f} |")
    ref = ev["reference"]["score"]
    lines.append(f"| held-out text (validation split) | - | - | {ref['gen_ppl']:.1f} | {ref['entropy']:.3f} | - |")
    return "\n".join(lines)


def sample_texts(ev: dict, n: int, chars: int) -> str:
    out = []
    for name, row in [*ev["models"].items(), ("held-out text", ev["reference"])]:
        texts = row["samples"]["texts"] if "samples" in row else row["texts"]
        out.append(f"**{name}**\n")
        for text in texts[:n]:
            flat = " ".join(text.split())
            out.append(f"> {flat[:chars]}{'...' if len(flat) > chars else ''}\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/adapt_smollm2")
    parser.add_argument("--minutes", type=float, default=55.0, help="train.sh's MINUTES")
    parser.add_argument("--docs", default=str(ROOT / "docs"))
    args = parser.parse_args(argv)
    runs, docs = Path(args.runs), Path(args.docs)
    ev = json.loads((runs / "eval.json").read_text())
    plot_curves(runs, ev, args.minutes, docs / "adapt_smollm2_curves.png")
    print(f"held-out: {ev['held_out']}  machine: {ev['machine']}\n")
    print(likelihood_table(ev), "\n")
    print(samples_table(ev), "\n")
    print(sample_texts(ev, 2, 400))
    sm = runs / "softmask_nfe.json"
    if sm.is_file():
        results = json.loads(sm.read_text())
        plot_softmask(results, docs / "adapt_smollm2_softmask.png")
        print(results["setup"], "\n")
        print(summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
