"""Progress output in logs (dlm/progress.py): with stdout and stderr redirected to files, training, evaluation and
sampling write whole lines (no carriage return), as many as the steps and batches call for, none wider than 80
columns; on a terminal (or with `bar`) the bars stay."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dlm.config import ConfigError, build_config
from dlm.progress import Lines, StepLines, duration, fit, other_bars_off, resolve, setting

REPO = Path(__file__).resolve().parents[1]


class Stream:
    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_modes_resolve_from_the_stream_and_the_environment(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert resolve("auto", Stream(True)) == "bar" and resolve("auto", Stream(False)) == "plain"
    assert resolve(True, Stream(False)) == "plain" and resolve(False, Stream(True)) == "off"
    assert resolve("bar", Stream(False)) == "bar" and resolve("plain", Stream(True)) == "plain"
    monkeypatch.setenv("TERM", "dumb")
    assert resolve("auto", Stream(True)) == "plain"
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("NO_COLOR", "1")
    assert resolve("auto", Stream(True)) == "plain" and resolve("bar", Stream(True)) == "bar"
    assert setting("TRUE") == "auto" and setting(None) == "off"
    with pytest.raises(ValueError, match="not one of auto, bar, plain, off"):
        setting("bars")


def test_trainer_progress_takes_modes_and_its_old_bool_values():
    assert build_config([]).trainer.progress == "auto"
    assert build_config(["trainer.progress=true"]).trainer.progress == "auto"
    assert build_config(["trainer.progress=false"]).trainer.progress == "off"
    assert build_config(["trainer.progress=plain"]).trainer.progress == "plain"
    for bad in ("trainer.progress=3", "trainer.progress=fancy", "trainer.progress_every=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            build_config([bad])


def test_lines_are_cut_to_the_width_and_rate_limited(monkeypatch):
    monkeypatch.setenv("COLUMNS", "50")
    assert len(fit("x" * 200)) == 50 and fit("x" * 200).endswith("...") and fit("short") == "short"
    assert [duration(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m"]
    out = Stream(False)
    lines = Lines("perplexity: batch", 5, every=3600, stream=out)
    for _ in range(5):
        lines.update()
    assert out.text.splitlines() == ["perplexity: batch 5/5 | 0s"]  # within the interval: only the last one
    out = Stream(False)
    steps = StepLines(2, every=0, stream=out)
    for _ in range(2):
        for _ in range(3):
            steps(None)
        steps.end_batch()
    assert len(out.text.splitlines()) == 2 * (3 + 1) and "batch 2/2 done | 3 steps" in out.text


def run_cli(args: list[str], tmp_path: Path, name: str, **env) -> tuple[list[str], list[str]]:
    """`python -m dlm.cli ARGS` with stdout and stderr redirected to files, as under a scheduler; their lines."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "NO_COLOR", "DLM_PROGRESS_SECONDS")}
    environ.update(PYTHONPATH=str(REPO), **env)
    with open(out, "w") as o, open(err, "w") as e:
        code = subprocess.run([sys.executable, "-m", "dlm.cli", *args], cwd=REPO, env=environ, stdout=o, stderr=e,
                              timeout=600).returncode
    text_out, text_err = out.read_text(), err.read_text()
    assert code == 0, text_err[-3000:]
    for text in (text_out, text_err):
        assert "\r" not in text and "\x1b" not in text  # no carriage-return bar, no terminal escape
    errs = text_err.splitlines()
    ours = [line for line in errs if line.startswith(("train step", "val   step", "eval:", "perplexity:", "sampling:"))]
    assert all(len(line) <= 80 for line in ours), [line for line in ours if len(line) > 80]
    assert not [line for line in errs if re.search(r"\.py:\d+: |Warning", line)], errs  # a readable log: no warnings
    return text_out.splitlines(), errs


def test_training_in_a_log_writes_a_line_every_n_steps_and_per_validation(micro_args, tmp_path):
    run = tmp_path / "run"  # (micro_args holds trainer.progress=false: the later override wins)
    # 12 steps, a line every 3 and a validation every 6: 4 training lines and 2 validation lines
    out, err = run_cli(["train", *micro_args(run, "trainer.progress=auto", "trainer.progress_every=3")], tmp_path, "a")
    train = [line for line in err if line.startswith("train step ")]
    val = [line for line in err if line.startswith("val   step ")]
    assert [line.split()[2] for line in train] == ["3/12", "6/12", "9/12", "12/12"], err
    assert [line.split()[2] for line in val] == ["6/12", "12/12"] and "ppl" in val[0]
    assert "loss" in train[0] and "tok/s" in train[0] and "ETA" in train[0] and "ETA" not in train[-1]
    assert any(line.startswith("dlm: training mdlm") for line in out)
    # Twice the steps (resumed to 24): twice the lines, counted from where the run resumed.
    args = [*micro_args(run, "trainer.max_steps=24", "trainer.progress_every=3"), "--progress", "plain"]
    out, err = run_cli(["train", *args], tmp_path, "b")
    assert [line.split()[2] for line in err if line.startswith("train step ")] == ["15/24", "18/24", "21/24", "24/24"]
    assert len([line for line in err if line.startswith("val   step ")]) == 2


def test_evaluation_and_sampling_in_a_log_write_a_line_per_batch(micro_run, text_folder, tmp_path):
    # 10 rows in batches of 4: 3 perplexity lines (DLM_PROGRESS_SECONDS=0: no rate limit)
    out, err = run_cli(["eval", str(micro_run), "--source", str(text_folder), "--split", "val", "--max-rows", "10",
                        "--batch-size", "4", "--num-t-samples", "1"], tmp_path, "eval", DLM_PROGRESS_SECONDS="0")
    assert [line.split(" | ")[0] for line in err if line.startswith("perplexity")] == [
        f"perplexity: batch {i}/3" for i in (1, 2, 3)], err
    assert err[0] == f"eval: {micro_run} (mdlm)" and out[0].split()[:2] == ["model", "process"]  # stdout: the table
    # 3 samples in batches of 2, 5 steps: a line per step and one per batch
    args = ["sample", str(micro_run), "--num-samples", "3", "--batch-size", "2", "--steps", "5", "--length", "16"]
    out, err = run_cli(args, tmp_path, "sample", DLM_PROGRESS_SECONDS="0")
    steps = [line for line in err if line.startswith("sampling: batch") and " | step " in line]
    assert len(steps) in (2 * 5, 2 * 6), err  # one event per step (and the final argmax, if the sampler has one)
    assert [line.split(" | ")[0] for line in err if " done | " in line] == ["sampling: batch 1/2 done",
                                                                          "sampling: batch 2/2 done"]
    assert out[0] == "--- sample 0 ---" and not any("sampling" in line for line in out)
    _, err = run_cli([*args, "--progress", "off"], tmp_path, "sample_off")
    assert err == [], err


def test_other_libraries_bars_are_off_unless_the_mode_is_bar():
    import io

    from tqdm.auto import tqdm

    for mode, drawn in (("plain", False), ("off", False), ("bar", True)):
        out = io.StringIO()
        with other_bars_off(mode):
            assert sum(tqdm(range(4), file=out)) == 6  # the iterable still runs
        assert bool(out.getvalue()) is drawn, mode
    out = io.StringIO()
    list(tqdm(range(2), file=out))  # restored after the block
    assert out.getvalue()
