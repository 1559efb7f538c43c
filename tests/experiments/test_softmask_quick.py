"""The soft-masking experiment end to end at --quick sizes: every stage runs and writes its table and plot."""

import re
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_softmask_experiment_quick(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["run.py", "--quick", "--out", str(tmp_path)])
    try:
        runpy.run_path(str(ROOT / "experiments" / "softmask" / "run.py"), run_name="__main__")
    except SystemExit as e:
        assert e.code == 0
    md = (tmp_path / "softmask.md").read_text()
    png = tmp_path / "softmask_quality_vs_nfe.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    labels = ("MDLM + SM training", "MDLM (equal compute)", "MDLM (equal steps)", "### ancestral", "### remdm_loop")
    for label in labels:
        assert label in md
    headline = md.split("### ancestral")[1].split("###")[0]
    rows = [line for line in headline.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [line.split("|")[1].strip() for line in rows] == ["4", "8"]  # one row per NFE of the quick grid
    assert all("±" in line for line in rows)  # spread over the seeds is shown
    results = (tmp_path / "work" / "results.jsonl").read_text().splitlines()
    # human text + 7 perplexity rows (base, 3 variants x 2 seeds)
    # + (first seed: 5 settings, second seed: the 2 headline ones) x 2 samplers x 2 NFE
    assert len(results) == 1 + 7 + (5 + 2) * 2 * 2
    # The cached runs and results are reused only for the settings that made them.
    monkeypatch.setattr(sys, "argv", ["run.py", "--quick", "--out", str(tmp_path), "--p-sm", "0.3"])
    try:
        runpy.run_path(str(ROOT / "experiments" / "softmask" / "run.py"), run_name="__main__")
    except SystemExit as e:
        assert "holds the runs and results of other settings (p_sm: 0.8 there, 0.3 now)" in str(e.code)
    else:
        raise AssertionError("a re-run with other settings must refuse the cached results")
