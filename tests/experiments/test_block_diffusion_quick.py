"""The block-diffusion experiment end to end at toy scale: trains AR, MDLM and BD3-LM (B = 4, 8, 16, fine-tuned
from the same MDLM checkpoint with the clip search), evaluates them and writes the table, plot and results."""

import importlib.util
import json
import math
from pathlib import Path

from dlm.process.clipped_schedule import clip_grid

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "block_diffusion" / "run.py"


def test_quick_run_writes_table_plot_and_results(tmp_path):
    spec = importlib.util.spec_from_file_location("bd3_experiment", SCRIPT)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    assert experiment.main(["--quick", "--out", str(tmp_path)]) == 0

    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    assert list(rows) == ["AR", "MDLM", "BD3-LM (B=4)", "BD3-LM (B=8)", "BD3-LM (B=16)"]
    for name, r in rows.items():
        assert math.isfinite(r["val_ppl"]) and r["val_ppl"] > 1 and math.isfinite(r["gen_ppl"])
        assert r["tokens_per_s"] > 0 and r["nfe"] > 0 and 0 < r["entropy"] <= math.log(16)
        assert r["bound"] == (name != "AR")
        if name.startswith("BD3"):
            assert tuple(r["clip"]) in clip_grid()  # the searched interval, stored in the model's config
    report = (tmp_path / "block_diffusion.md").read_text()
    assert "| BD3-LM (B=8) |" in report and "Published ordering" in report
    assert (tmp_path / "block_diffusion.png").stat().st_size > 10_000
    # Finished runs are reused with the training times they took (not the seconds a no-op resume takes) ...
    finished = [d for d in (tmp_path / "runs").iterdir() if (d / "model").is_dir()]
    assert len(finished) >= 5 and all((d / "train_seconds.txt").is_file() for d in finished)
    # ... and only for the scale that trained them.
    try:
        experiment.main(["--out", str(tmp_path)])
    except SystemExit as e:
        assert "holds the runs of the 'quick' scale, not 'full'" in str(e.code)
    else:
        raise AssertionError("a full run must refuse a folder of quick runs")
