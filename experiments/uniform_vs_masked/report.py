"""The page and the plot of experiments/uniform_vs_masked/run.py (docs/uniform_vs_masked.md and .png)."""

from __future__ import annotations

import datetime
import platform
import statistics
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def mean_sd(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def machine() -> str:
    flags, text = "", ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        have = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f" {f}" in text]
        flags = ", ".join(have[:2]) or "no AVX2"
    except OSError:
        pass
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    return f"{name or platform.machine()} ({flags}; 2 cores shared by the runs), float32, " \
           f"{datetime.date.today().isoformat()}"


def corpus_tables(corpus: list[dict]) -> list[str]:
    rows = [r for r in corpus if r["key"].startswith("ppl/")]
    iw = any(r.get("iw_ppl") for r in rows)
    lines = ["## Corpus: perplexity", "", "Validation perplexity, mean ± sd over seeds: the bound of each process's "
             "`nelbo` (AR: exact)" + ("; `iw`: the importance-weighted any-order estimate (docs/esolm.md); `ao`: the "
                                      "mean single-order bound" if iw else "") + ".", "",
             "| method | val perplexity | " + ("iw | ao | " if iw else "") + "train seconds |",
             "|---|---|" + ("---|---|" if iw else "") + "---|"]
    by = defaultdict(list)
    for r in rows:
        by[r["method"]].append(r)
    for m, rs in by.items():
        extra = "".join(f"{mean_sd([r[k] for r in rs if r.get(k)], '{:.2f}')} | " for k in ("iw_ppl", "ao_ppl")) \
            if iw else ""
        lines.append(f"| {m} | {mean_sd([r['val_ppl'] for r in rs], '{:.2f}')} | {extra}"
                     f"{mean_sd([r['train_seconds'] for r in rs], '{:.0f}')} |")
    adaptive = any(r.get("sampler") == "renoise" for r in corpus)
    lines += ["", "## Corpus: samples against NFE", "",
              "Generative perplexity under SmolLM2-135M (lower is better) and unigram entropy (too low = "
              "repetitive), mean over seeds" + (". `renoise (adaptive)`: budget = the largest NFE; NFE = the calls "
                                                "it chose (mean per row)" if adaptive else "") + ".", "",
              "| method | sampler | NFE | gen. perplexity | entropy |", "|---|---|---|---|---|"]
    gen = defaultdict(list)
    for r in corpus:
        if r["key"].startswith("gen/"):
            gen[(r["method"], r["sampler"], r["budget"])].append(r)
    for (m, s, b), rows in gen.items():
        nfe = statistics.mean(r["nfe_mean_row"] for r in rows)
        label = f"{s} (adaptive)" if s == "renoise" else s
        lines.append(f"| {m} | {label} | {nfe:.1f} | {mean_sd([r['gen_ppl'] for r in rows])} | "
                     f"{mean_sd([r['entropy'] for r in rows], '{:.2f}')} |")
    return lines


def sudoku_table(sudoku: list[dict]) -> list[str]:
    lines = ["## Sudoku (4×4): puzzles solved", "", "experiments/sudoku/run.py, the same training recipe for every "
             "method (SFT on pairs, 1,200 steps, 2 seeds); mean ± sd over seeds.", "",
             "| method | sampler | NFE per puzzle | solved % | cells % |", "|---|---|---|---|---|"]
    groups = defaultdict(list)
    for r in sudoku:
        groups[(r["method"], r["label"])].append(r)
    for (m, label), rows in groups.items():
        lines.append(f"| {m} | {label} | {statistics.mean(r['nfe'] for r in rows):.1f} | "
                     f"{mean_sd([100 * r['solved'] for r in rows])} | "
                     f"{mean_sd([100 * r['cell_accuracy'] for r in rows])} |")
    return lines


def plot(corpus: list[dict], sudoku: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series = defaultdict(lambda: defaultdict(list))  # label -> budget -> [(calls made, gen ppl) per seed]
    for r in corpus:
        if r["key"].startswith("gen/"):
            series[f"{r['method']} / {r['sampler']}"][r["budget"]].append((r["nfe_mean_row"], r["gen_ppl"]))
    for label, points in series.items():
        means = sorted((statistics.mean(n for n, _ in p), statistics.mean(g for _, g in p)) for p in points.values())
        axes[0].plot([n for n, _ in means], [g for _, g in means], "o-" if len(means) > 1 else "*", label=label,
                     markersize=5 if len(means) > 1 else 12)  # one point per budget: means over seeds
    axes[0].set(xscale="log", yscale="log", xlabel="NFE", ylabel="generative perplexity (SmolLM2-135M)",
                title="corpus: samples")
    axes[0].legend(fontsize=6)
    sud = defaultdict(lambda: defaultdict(list))
    for r in sudoku:
        sud[r["method"]][r["nfe"]].append(100 * r["solved"])
    for m, points in sud.items():
        xs = sorted(points)
        axes[1].plot(xs, [max(points[x]) for x in xs], "o", label=m, alpha=0.7)
    axes[1].set(xscale="log", xlabel="NFE per puzzle", ylabel="puzzles solved % (best sampler at that NFE)",
                title="Sudoku 4×4")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(corpus: list[dict], sudoku: list[dict], sizes, args, out: Path, stem: str = "uniform_vs_masked",
                 title: str = "Uniform-state vs masked diffusion", folder: Path = HERE,
                 pointers: str = "the methods are docs/sedd.md and docs/uniform.md, the renoising sampler "
                                 "docs/renoise.md") -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / f"{stem}.md", out / f"{stem}.png"
    script = f"experiments/{folder.name}/run.py"
    command = f"python {script}" + (" --quick" if args.quick else "")
    lines = [f"# {title}", "",
             f"Written by `{command}` ({machine()}; {sizes.steps} training steps per run, batch {sizes.batch}, "
             f"seeds {list(sizes.seeds)}, model {' '.join(sizes.model)}). The protocol is the docstring of "
             f"{script}; {pointers}.", "", f"![plot]({png.name})", ""]
    conclusions = folder / "conclusions.md"
    if conclusions.is_file() and not args.quick:
        lines += [conclusions.read_text().strip(), ""]
    if corpus:
        lines += corpus_tables(corpus) + [""]
    if sudoku:
        lines += sudoku_table(sudoku) + [""]
    md.write_text("\n".join(lines))
    return md, plot(corpus, sudoku, png)
