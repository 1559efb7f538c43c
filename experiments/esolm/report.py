"""The page and the plot of experiments/esolm/run.py (docs/esolm_experiment.md and .png): the same layout as
experiments/uniform_vs_masked/report.py, with the any-order likelihood columns."""

from __future__ import annotations

from pathlib import Path

from experiments.uniform_vs_masked.report import write_report as _write

HERE = Path(__file__).resolve().parent


def write_report(corpus: list[dict], sudoku: list[dict], sizes, args, out: Path) -> tuple[Path, Path]:
    return _write(corpus, sudoku, sizes, args, out, stem="esolm_experiment", title="Eso-LM against MDLM, AR and BD3-LM",
                  folder=HERE, pointers="the method is docs/esolm.md, its sampler docs/esolm_sampler.md, latency "
                                        "bench/esolm_latency.py")
