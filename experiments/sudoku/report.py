"""The Sudoku experiment's outputs: a Markdown table with the three targets (sudoku.md) and a plot of puzzles solved
against network calls per puzzle (sudoku.png)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from dlm.precision import describe_cpu

LABELS = {"mdlm": "MDLM", "ar": "AR", "bd3lm": "BD3-LM", "sm": "MDLM + soft-masking",
          "esolm_b1": "Eso-LM (B) α0=1", "esolm_b05": "Eso-LM (B) α0=0.5", "esolm_b025": "Eso-LM (B) α0=0.25",
          "esolm_a1": "Eso-LM (A) α0=1", "sedd_absorb": "SEDD-absorbing", "sedd_uniform": "SEDD-uniform",
          "udlm": "UDLM (uniform)", "udlm_sc": "UDLM + self-conditioning", "gidd": "GIDD (p_u 0.2)"}


def grouped(results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows of the same (method, decoding rule) over seeds."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        out.setdefault((r["method"], r["label"]), []).append(r)
    return out


def mean_std(values: list[float], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def mean(rows: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in rows)


def spread(rows: list[dict], key: str) -> float:
    return statistics.stdev(r[key] for r in rows) if len(rows) > 1 else 0.0


def targets(groups: dict) -> list[str]:
    """The issue's three targets, each said met or not, with its numbers."""
    lines = []
    rand, margin = groups.get(("mdlm", "random, k=1")), groups.get(("mdlm", "margin, k=1"))
    if rand and margin:
        r, m = mean(rand, "solved"), mean(margin, "solved")
        ratio = m / r if r > 0 else float("inf")
        if m == 0:
            lines.append("- **Ordering effect**: not measurable: MDLM solves no puzzle in margin order.")
        else:
            lines.append(f"- **Ordering effect** (margin ≥ 5× random at one cell per call): MDLM solves {100 * m:.1f} % "
                     f"in margin order and {100 * r:.1f} % in random order, {ratio:.1f}× — "
                     f"{'met' if ratio >= 5 else 'not met'}.")
    if margin and mean(margin, "solved") == 0:
        lines.append("- **Parallel decoding**: not measurable: MDLM solves no puzzle at one cell per call.")
    elif margin:
        base, base_nfe = mean(margin, "solved"), mean(margin, "nfe")
        best = None
        for (method, label), rows in groups.items():
            if method != "mdlm":
                continue
            nfe, solved = mean(rows, "nfe"), mean(rows, "solved")
            if nfe * 3 <= base_nfe and solved >= base - 0.01 and (best is None or nfe < best[1]):
                best = (label, nfe, solved)
        if best:
            lines.append(f"- **Parallel decoding** (≥ 3× fewer calls at ≤ 1 point fewer puzzles): `{best[0]}` solves "
                         f"{100 * best[2]:.1f} % in {best[1]:.1f} calls per puzzle against {100 * base:.1f} % in "
                         f"{base_nfe:.1f} (margin, one cell per call) — met.")
        else:
            near = sorted(((mean(rows, "nfe"), mean(rows, "solved"), label) for (method, label), rows in
                           groups.items() if method == "mdlm" and mean(rows, "nfe") * 3 <= base_nfe),
                          key=lambda x: -x[1])
            what = f"; the best rule with ≥ 3× fewer calls, `{near[0][2]}`, solves {100 * near[0][1]:.1f} % in " \
                   f"{near[0][0]:.1f} calls" if near else ""
            lines.append(f"- **Parallel decoding** (≥ 3× fewer calls at ≤ 1 point fewer puzzles): not met against "
                         f"{100 * base:.1f} % in {base_nfe:.1f} calls (margin, one cell per call){what}.")
    for k in (4, 8):
        for order in ("margin", "top-prob"):
            sm, plain = groups.get(("sm", f"{order}, k={k}")), groups.get(("mdlm", f"{order}, k={k}"))
            if not (sm and plain):
                continue
            d = mean(sm, "solved") - mean(plain, "solved")
            noise = max(spread(sm, "solved"), spread(plain, "solved"))
            verdict = "beyond the seed spread" if abs(d) > 2 * noise and noise > 0 else "within the seed spread"
            lines.append(f"- **Soft-masking at k = {k}, {order} order**: {100 * mean(sm, 'solved'):.1f} % against "
                         f"{100 * mean(plain, 'solved'):.1f} % for plain MDLM ({100 * d:+.1f} points; seed spread "
                         f"{100 * noise:.1f}) — {verdict}.")
    return lines


def plot(groups: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"random": ("tab:gray", "o"), "top-prob": ("tab:blue", "s"), "margin": ("tab:green", "^"),
              "entropy": ("tab:purple", "v")}
    for method, dash in (("mdlm", "-"), ("sm", ":")):
        for order, (color, marker) in styles.items():
            pts = sorted((mean(rows, "nfe"), 100 * mean(rows, "solved")) for (m, label), rows in groups.items()
                         if m == method and label.startswith(f"{order}, k="))
            if pts:
                ax.plot(*zip(*pts), dash, color=color, marker=marker,
                        label=f"{LABELS[method]}, {order}" if method == "mdlm" or order == "margin" else None,
                        alpha=1.0 if method == "mdlm" else 0.6)
    others = [(("mdlm", "threshold"), "tab:red", "*", "MDLM, threshold"), (("ar", ""), "black", "D", "AR"),
              (("bd3lm", ""), "tab:orange", "P", "BD3-LM"), (("mdlm", "ancestral"), "tab:brown", "x", "MDLM, ancestral"),
              (("mdlm", "ReMDM"), "tab:pink", "h", "MDLM, ReMDM"),
              (("sedd_absorb", "tweedie"), "tab:olive", "<", "SEDD-absorbing, tweedie"),
              (("sedd_uniform", "tweedie"), "tab:cyan", ">", "SEDD-uniform, tweedie")]
    for (method, prefix), color, marker, name in others:
        pts = [(mean(rows, "nfe"), 100 * mean(rows, "solved")) for (m, label), rows in groups.items()
               if m == method and label.startswith(prefix)]
        if pts:
            ax.scatter(*zip(*pts), color=color, marker=marker, s=60, label=name, zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("network calls per puzzle")
    ax.set_ylabel("test puzzles solved (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: list[dict], scale: dict, args, docs: Path) -> tuple[Path, Path]:
    docs.mkdir(parents=True, exist_ok=True)
    groups = grouped(results)
    png = plot(groups, docs / "sudoku.png")
    seeds = sorted({r["seed"] for r in results})
    train = {m: statistics.mean(r["train_seconds"] for r in results if r["method"] == m)
             for m in dict.fromkeys(r["method"] for r in results)}
    lines = [
        f"# Sudoku {scale['size']}×{scale['size']}: decoding order, parallel decoding, soft-masking, remasking",
        "",
        f"Produced by `python experiments/sudoku/run.py{' --quick' if args.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d')} ({describe_cpu()}; trained and sampled in float32). Every number "
        "below comes from that run; the protocol is in the script's docstring.",
        "",
        f"- Data: `python -m dlm.tasks.sudoku --size {scale['size']} --givens {scale['givens']} --train "
        f"{scale['train']}` (seed 0); {results[0]['n']} test puzzles, disjoint from training by solution grid.",
        f"- Every model: `{' '.join(scale['model'])}`, {scale['steps']} steps of batch {scale['batch']}, lr "
        f"{scale['lr']}, seeds {', '.join(map(str, seeds))}. Mean wall time of a training run (the 2 cores were "
        "shared with other jobs, one torch thread: these say little about speed): "
        + ", ".join(f"{LABELS[m]} {s:.0f} s" for m, s in train.items()) + ".",
        "- Solved: every row, column and box holds each digit once and every given is kept. NFE: network calls per "
        "puzzle. Values are mean ± standard deviation over seeds"
        + (" (one seed, no ±: " + ", ".join(LABELS[m] for m in few) + ")" if (few := [
            m for m in train if len({r["seed"] for r in results if r["method"] == m}) < len(seeds)]) else "") + ".",
        "",
        "## Targets",
        "",
        *targets(groups),
        "",
        "## All results",
        "",
        "| model | decoding | solved (%) | cells correct (%) | violations | calls per puzzle |",
        "|---|---|---|---|---|---|",
    ]
    families = ["random", "top-prob", "margin", "entropy", "ancestral", "remdm", "renoise", "left-to-right", "blockwise",
                "score", "esolm"]
    ordered = sorted(groups.items(), key=lambda kv: (list(LABELS).index(kv[0][0]), families.index(kv[1][0]["order"])
                                                     if kv[1][0]["order"] in families else 99,
                                                     kv[0][1].startswith("threshold"), -mean(kv[1], "nfe")))
    for (method, label), rows in ordered:
        lines.append(f"| {LABELS[method]} | {label} | {mean_std([r['solved'] for r in rows], 100)} | "
                     f"{mean_std([r['cell_accuracy'] for r in rows], 100)} | "
                     f"{mean_std([r['violations'] for r in rows], 1, '{:.2f}')} | "
                     f"{mean_std([r['nfe'] for r in rows], 1)} |")
    lines += ["", f"![puzzles solved against network calls]({png.name})", ""]
    md = docs / "sudoku.md"
    md.write_text("\n".join(lines))
    return md, png
