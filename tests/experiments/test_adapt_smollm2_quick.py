"""The SmolLM2 adaptation experiment's evaluation scripts end to end at toy scale, on the micro MDLM run: likelihood
in bits per byte, samples scored, the soft-masking-vs-NFE rows, table and plot (experiments/adapt_smollm2/)."""

import importlib
import json
import math
import sys
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[2] / "experiments" / "adapt_smollm2"


def _module(name):
    sys.path.insert(0, str(FOLDER))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(FOLDER))


def test_quick_evaluation_and_softmask_nfe(tmp_path, micro_run):
    (tmp_path / "tiny-mdlm").symlink_to(micro_run, target_is_directory=True)
    measure = _module("measure")
    assert measure.main(["--runs", str(tmp_path), "--quick"]) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    texts = measure.held_out_texts(300)
    assert results["held_out"]["bytes"] == sum(len(t.encode()) for t in texts) > 0
    for row in results["models"].values():
        lk = row["likelihood"]
        assert lk["bound"] and math.isclose(lk["bits_per_byte"], lk["nll_per_token"] * lk["tokens"]
                                            / (math.log(2) * results["held_out"]["bytes"]))
        assert len(row["samples"]["texts"]) == 2 and math.isfinite(row["score"]["gen_ppl"])
    assert math.isfinite(results["reference"]["score"]["gen_ppl"])

    softmask_nfe = _module("softmask_nfe")
    out = tmp_path / "sm.json"
    assert softmask_nfe.main([str(tmp_path / "tiny-mdlm"), "--quick", "--out", str(out)]) == 0
    sm = json.loads(out.read_text())
    assert sorted(sm["rows"]) == ["4/0/plain", "4/0/sm", "4/1/plain", "4/1/sm"]
    assert all(r["nfe"] == 4 for r in sm["rows"].values())
    table = softmask_nfe.summary(sm)
    assert "| 4 (4) | plain |" in table and "soft-masking (training-free)" in table
    softmask_nfe.plot(sm, tmp_path / "sm.png")
    assert (tmp_path / "sm.png").stat().st_size > 5_000
