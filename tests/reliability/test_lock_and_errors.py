"""One writer per run folder; clean one-line errors (exit 2) instead of tracebacks; no silent garbage
(issue 14, items 5-8 and 10)."""

import errno
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dlm.checkpoint import AtomicCheckpointIO, CheckpointError, read_checkpoint
from dlm.cli import main
from dlm.train.lock import RunLock, RunLocked

REPO = Path(__file__).resolve().parents[2]


def run_cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# ------------------------------------------------------------------------------------------------- the lock
def test_a_second_writer_gets_a_clear_error(micro_args, tmp_path, capsys):
    run = tmp_path / "locked"
    with RunLock(run):  # another `dlm train` holds the folder
        code, err = run_cli(["train", *micro_args(run)], capsys)
        assert code == 2 and re.search(rf"{re.escape(str(run))} is in use by another dlm train \(pid {os.getpid()} "
                                       rf"on host {re.escape(socket.gethostname())}", err), err
        assert not (run / "checkpoints").exists()  # nothing was written
    with RunLock(run):  # released: it can be taken again
        pass
    assert not (run / ".lock").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"taking over the lock of {tmp_path} left by pid {pid}" in capsys.readouterr().out


def test_two_runs_on_one_folder_one_refused(micro_args, tmp_path):
    """Two `dlm train` processes on the same folder at once: the second exits 2 naming the first (pid, host)."""
    run = tmp_path / "twice"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "dlm.cli", "train", *micro_args(run, "trainer.max_steps=100000")]
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run / ".lock").is_file() or not (run / ".lock").read_text():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert first.poll() is None  # the first was training all along
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2 and f"(pid {first.pid} on host" in second.stderr, second.stderr[-2000:]
    assert "Traceback" not in second.stderr


# ------------------------------------------------------------------------------------------------- disks
def test_a_full_disk_during_a_checkpoint_says_how_much_space_is_needed(micro_run, tmp_path):
    """A real ENOSPC from the kernel (/dev/full) under torch.save: one line, with the size needed."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    ckpt = read_checkpoint(micro_run / "checkpoints" / "last.ckpt")
    path = tmp_path / "last.ckpt"
    (tmp_path / "last.ckpt.tmp").symlink_to("/dev/full")
    with pytest.raises(CheckpointError, match=r"^no space left on device: need ~[\d.]+ [KMG]B free for an atomic "
                                              r"checkpoint "
                                              rf"\({re.escape(str(path))}"):
        AtomicCheckpointIO().save_checkpoint(ckpt, path)
    assert not path.exists() and not (tmp_path / "last.ckpt.tmp").exists()


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys")
@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC])
def test_read_only_or_full_disk_anywhere_in_a_run_is_one_line(micro_args, tmp_path, capsys, monkeypatch, err):
    """The disk fails at the run's first checkpoint (EROFS: read-only; ENOSPC: full): exit 2, one line."""
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".ckpt"):
            raise OSError(err, os.strerror(err), str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    code, err_text = run_cli(["train", *micro_args(tmp_path / "ro")], capsys)
    assert code == 2 and len(err_text.strip().splitlines()) == 1, err_text
    expected = "no space left on device: need ~" if err == errno.ENOSPC else "read-only file system"
    assert expected in err_text and "last.ckpt" in err_text, err_text


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys, which refuses new folders even to root")
def test_an_unwritable_out_dir_is_one_line(micro_args, capsys):
    code, err = run_cli(["train", *micro_args("/sys/dlm-test-run")], capsys)
    assert code == 2 and "cannot write /sys/dlm-test-run" in err and "trainer.out_dir=" in err, err


def test_an_unwritable_token_cache_falls_back_to_no_cache(micro_args, tmp_path):
    from dlm.config import build_config
    from dlm.train.run import train

    with pytest.warns(UserWarning, match=r"token cache .* is not writable .* continuing without the cache"):
        train(build_config(micro_args(tmp_path / "nocache", "data.cache_dir=/sys/dlm-cache", "trainer.max_steps=2")))
    assert read_checkpoint(tmp_path / "nocache" / "checkpoints" / "last.ckpt")["global_step"] == 2


# ------------------------------------------------------------------------------------------------- devices, inputs
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_missing_gpu_is_one_line(micro_run, micro_args, tmp_path, capsys):
    code, err = run_cli(["sample", str(micro_run), "--device", "cuda", "--steps", "2"], capsys)
    assert code == 2 and "--device cuda: this machine has no CUDA GPU" in err, err
    code, err = run_cli(["train", *micro_args(tmp_path / "gpu", "trainer.accelerator=gpu")], capsys)
    assert code == 2 and "trainer.accelerator=gpu but this machine has no CUDA GPU" in err, err
    assert not (tmp_path / "gpu").exists()


def test_a_missing_evaluation_model_and_a_text_checkpoint_are_one_line(micro_run, tmp_path, capsys):
    code, err = run_cli(["eval", str(micro_run), "--gen-ppl", "--eval-model", str(tmp_path / "nope")], capsys)
    assert code == 2 and f"--eval-model {tmp_path / 'nope'}: no such folder" in err, err
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    code, err = run_cli(["sample", str(text)], capsys)
    assert code == 2 and "not a dlm checkpoint" in err, err


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "nan"], "temperature=nan must be >= 0 and finite"),
    (["--temperature", "inf"], "temperature=inf must be >= 0 and finite"),
    (["--length", "0"], "length=0 must be a positive integer"),
    (["--stride", "0"], "stride=0 must be a positive integer"),
    (["--num-samples", "0"], "num_samples=0 must be a positive integer"),
])
def test_sampling_arguments_that_mean_nothing_are_refused(micro_run, capsys, argv, message):
    code, err = run_cli(["sample", str(micro_run), "--steps", "2", *argv], capsys)
    assert code == 2 and message in err, err


def test_the_api_refuses_them_too(micro_run):
    import dlm

    model = dlm.load(micro_run)
    for kw, message in ((dict(temperature=float("nan")), "temperature"), (dict(length=0), "length=0"),
                        (dict(length=40, stride=0), "stride=0")):
        with pytest.raises(ValueError, match=message):
            model.generate(steps=2, **kw)


def test_bpe_training_on_a_long_line_without_spaces_is_linear():
    """300,000 letters without a space took 27 s (3 MB: over 400 s; quadratic); split into runs of 256, ~1 s."""
    import random
    import string

    from dlm.data.tokenizer import LONGEST_RUN, split_long_runs, train_bpe

    rng = random.Random(0)
    line = "".join(rng.choice(string.ascii_lowercase) for _ in range(300_000))
    assert max(len(r) for r in split_long_runs(line).split()) == LONGEST_RUN
    assert split_long_runs("ordinary text, short words") == "ordinary text, short words"
    t0 = time.perf_counter()
    tok = train_bpe(["Some ordinary text. " * 50, line], vocab_size=600)
    assert time.perf_counter() - t0 < 10
    assert tok.decode(tok(line[:5000])["input_ids"]) == line[:5000]  # still lossless on the long line


def test_a_nan_before_the_first_checkpoint_does_not_claim_one_is_kept(micro_args, tmp_path, monkeypatch):
    from dlm.config import build_config
    from dlm.process import MaskedDiffusion
    from dlm.train.lit_module import TrainingDiverged
    from dlm.train.run import train

    loss = MaskedDiffusion.loss

    def nan_at_once(self, network, batch, generator=None, t=None, **kw):
        out = loss(self, network, batch, generator, t, **kw)
        if t is None:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MaskedDiffusion, "loss", nan_at_once)
    with pytest.raises(TrainingDiverged, match=r"nan at step 0; training stopped; no checkpoint had been written yet") \
            as err:
        train(build_config(micro_args(tmp_path / "nan0")))
    assert "last good checkpoint" not in str(err.value)


def test_the_dev_extra_holds_every_package_the_tests_import():
    """`pip install -e .[dev]` then pytest: every third-party module a test imports comes with the runtime
    dependencies or the dev extra (the eval extra's packages are only ever importorskip'd)."""
    import ast
    import importlib.metadata as md

    tomllib = pytest.importorskip("tomllib")

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!\[ ;]", d)[0].lower().replace("_", "-")
                for d in project["dependencies"] + project["optional-dependencies"]["dev"]}
    dists = md.packages_distributions()
    missing = set()
    for path in (REPO / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("dlm", "tests", "kill_campaign"):
                    continue
                owners = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
                # a package pulled in by a declared one (torch brings sympy, ...) still has to be declared if a
                # test imports it directly
                if not owners & declared:
                    missing.add(f"{top} ({path.relative_to(REPO)})")
    assert not missing, f"imported by tests but not in dependencies or the dev extra: {sorted(missing)}"


def test_torch_short_write_on_a_full_disk_is_reported_as_no_space(micro_run, tmp_path, monkeypatch):
    """On a real full file system (a 1.5 MB tmpfs) torch.save fails with its own RuntimeError ("unexpected pos"),
    not an OSError; it reads "no space left on device", not inline_container.cc."""
    ckpt = read_checkpoint(micro_run / "checkpoints" / "last.ckpt")

    def short_write(obj, f, *a, **kw):
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1439424 vs 1439312")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(CheckpointError, match=r"^no space left on device: need ~[\d.]+ [KMG]B free") as err:
        AtomicCheckpointIO().save_checkpoint(ckpt, tmp_path / "last.ckpt")
    assert "inline_container" not in str(err.value) and not list(tmp_path.iterdir())
