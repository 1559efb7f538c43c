"""The Sudoku experiment end to end at toy scale (experiments/sudoku/): writes the task folder, trains an MDLM by
`dlm train data.format=pairs`, evaluates every decoding rule through the generation door, and writes the table
(with the targets) and the plot."""

import importlib.util
import json
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[2] / "experiments" / "sudoku"


def test_quick_run_writes_results_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(FOLDER))
    spec = importlib.util.spec_from_file_location("sudoku_experiment", FOLDER / "run.py")
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    assert experiment.main(["--quick", "--out", str(tmp_path), "--methods", "mdlm"]) == 0

    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    labels = [r["label"] for r in rows]
    cells = 4 * 4 + 1  # the board's cells and the EOS slot
    expected = experiment.decoders("mdlm", cells, experiment.SCALES["quick"])
    assert labels == [d["label"] for d in expected]
    for r in rows:
        assert r["n"] == 24 and r["nfe"] > 0
        assert 0 <= r["solved"] <= 1 and 0 <= r["cell_accuracy"] <= 1 and r["violations"] >= 0
    by = {r["label"]: r for r in rows}
    assert by["margin, k=1"]["nfe"] == cells and by["margin, k=8"]["nfe"] == 3  # ceil(17 / 8) calls
    report = (tmp_path / "sudoku.md").read_text()
    assert "## Targets" in report and "| MDLM | margin, k=1 |" in report
    assert (tmp_path / "sudoku.png").stat().st_size > 0
