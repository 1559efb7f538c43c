"""The cases left by the second outside campaign (issue 18, items 2-7): one line and exit 2 naming the file or the
argument and the fix, the token cache's documented fallback on a full disk, and exports that refuse a folder
that is not empty unless told to overwrite it. The disk cases inject the error the library raises on a real full
disk (the messages below were read on a 64 KB tmpfs: safetensors 0.8.0 and tokenizers)."""

import errno
import os
import shutil
import warnings

import pytest

from dlm.checkpoint import read_checkpoint
from dlm.cli import main
from dlm.config import build_config
from dlm.train.run import train

FULL = "No space left on device (os error 28)"  # how tokenizers and safetensors end their message on ENOSPC


def run_cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out


# ------------------------------------------------------------------------------------------------- full disks
def test_a_token_cache_on_a_full_disk_is_skipped_with_one_warning(micro_args, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import dlm.data.packing as packing

    def full(*a, **k):
        raise SafetensorError(f"Error while serializing: I/O error: {FULL}")

    monkeypatch.setattr(packing, "save_file", full)
    cache = tmp_path / "cache"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(build_config(micro_args(tmp_path / "run", f"data.cache_dir={cache}", "trainer.max_steps=2")))
    cache_warnings = [str(w.message) for w in seen if "token cache" in str(w.message)]
    assert len(cache_warnings) == 1 and "no space left on device" in cache_warnings[0].lower(), cache_warnings
    assert "continuing without the cache" in cache_warnings[0]
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert not list(cache.glob("*")) if cache.exists() else True  # no partial cache file


def test_a_full_disk_while_the_tokenizer_is_saved_is_one_line(micro_args, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    def full(self, *a, **k):
        raise Exception(FULL)  # what the tokenizers library raises

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", full)
    run = tmp_path / "run"
    code, out = run_cli(["train", *micro_args(run)], capsys)
    assert code == 2 and len(out.err.strip().splitlines()) == 1, out.err
    assert out.err.startswith(f"dlm train: error: cannot write {run}: no space left on device;"), out.err
    assert not (run / "tokenizer").exists() and not list(run.glob(".*.tmp"))


def test_a_full_disk_while_the_csv_log_is_written_names_the_file(micro_args, tmp_path, capsys, monkeypatch):
    from lightning.fabric.loggers.csv_logs import _ExperimentWriter

    def full(self):  # a buffered write fails when the file is flushed: an OSError without a file name
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_ExperimentWriter, "save", full)
    run = tmp_path / "run"
    code, out = run_cli(["train", *micro_args(run)], capsys)
    assert code == 2 and len(out.err.strip().splitlines()) == 1, out.err
    assert f"cannot write {run / 'logs' / 'part-000' / 'metrics.csv'}: no space left on device" in out.err, out.err
    assert "trainer.out_dir=" in out.err


def test_free_space_is_not_rounded_to_zero(tmp_path, monkeypatch):
    from dlm.guards import human_size, no_space_message

    assert [human_size(n) for n in (0, 1, 340 * 1024, int(2.2 * 2**20), 3 * 2**30)] == [
        "0 KB", "1 KB", "340 KB", "2.2 MB", "3.0 GB"]
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=int(2.2 * 2**20)))
    msg = no_space_message(tmp_path / "last.ckpt", int(3.1 * 2**20))
    assert "need ~3.1 MB free for an atomic checkpoint" in msg and "; 2.2 MB free there)" in msg, msg


# ------------------------------------------------------------------------------------------------- arguments
def test_a_prompt_or_template_with_a_lone_surrogate_is_one_line(micro_run, capsys):
    bad = os.fsdecode(b"\xed\xa0\x80abc")  # what Python makes of argument bytes that are not UTF-8
    for option in ("--prompt", "--template"):
        code, out = run_cli(["sample", str(micro_run), option, bad, "--steps", "2"], capsys)
        assert code == 2, out.err
        assert out.err.strip() == (f"dlm sample: error: {option} is not valid UTF-8 text (b'\\xed\\xa0\\x80' at "
                                   "character 0); pass UTF-8 text (check the shell quoting and the terminal's "
                                   "encoding)"), out.err


def test_an_out_dir_that_is_a_file_is_one_line(micro_args, tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("not a folder")
    for out_dir in (f, f / "run"):
        code, out = run_cli(["train", *micro_args(out_dir)], capsys)
        assert code == 2 and f"{f} is a file, not a folder; set trainer.out_dir" in out.err, out.err
    assert f.read_text() == "not a folder"


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan"])
def test_a_non_finite_learning_rate_is_refused_before_the_setup(tmp_path, capsys, value):
    code, out = run_cli(["train", f"optim.lr={value}", f"trainer.out_dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and "optim.lr=" in out.err and "must be" in out.err, out.err
    assert not (tmp_path / "run").exists()


def test_init_from_an_autoregressive_run_into_a_diffusion_run_is_refused(micro_args, tmp_path, capsys):
    ar = tmp_path / "ar"
    train(build_config(micro_args(ar, "process=ar", "trainer.max_steps=2")))
    code, out = run_cli(["train", *micro_args(tmp_path / "mdlm", f"init_from={ar / 'model'}")], capsys)
    assert code == 2, out.err
    assert f"init_from={ar / 'model'} was trained with process=ar: its head predicts the next token" in out.err
    assert "process=mdlm" in out.err and "init_from=hf:" in out.err
    assert not (tmp_path / "mdlm" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------- export
def test_export_refuses_a_folder_that_is_not_empty_unless_told_to_overwrite(micro_run, tmp_path, capsys):
    from dlm.pipeline import load

    out_dir = tmp_path / "export"
    out_dir.mkdir()
    (out_dir / "special_tokens_map.json").write_text("{}")  # a stray tokenizer file: the loader would refuse it
    (out_dir / "notes.txt").write_text("mine")
    ckpt = str(micro_run / "checkpoints" / "last.ckpt")
    code, out = run_cli(["export", ckpt, str(out_dir)], capsys)
    assert code == 2 and f"export folder {out_dir} is not empty" in out.err and "--overwrite" in out.err, out.err
    assert sorted(p.name for p in out_dir.iterdir()) == ["notes.txt", "special_tokens_map.json"]  # untouched

    code, out = run_cli(["export", ckpt, str(out_dir), "--overwrite"], capsys)
    assert code == 0, out.err
    assert (out_dir / "notes.txt").read_text() == "mine"  # a file dlm does not write stays
    stray = out_dir / "special_tokens_map.json"
    assert not stray.exists() or stray.read_text() != "{}"  # removed (this tokenizer does not write one) or replaced
    load(out_dir)  # its own loader accepts it
    code, out = run_cli(["export", ckpt, str(out_dir), "--overwrite"], capsys)  # again, over its own export
    assert code == 0, out.err
    load(out_dir)

    target = tmp_path / "file"
    target.write_text("x")
    code, out = run_cli(["export", ckpt, str(target)], capsys)
    assert code == 2 and f"{target} is a file, not a folder" in out.err, out.err


# ------------------------------------------------------------------------------------------------- resume
def test_resume_says_it_is_exact_instead_of_lightnings_warning(micro_run, micro_args, tmp_path, capsys, recwarn):
    run = tmp_path / "B"
    shutil.copytree(micro_run, run)
    train(build_config(micro_args(run, "trainer.max_steps=13")))
    assert not [w for w in recwarn if "not resumable" in str(w.message)]
    lines = [line for line in capsys.readouterr().out.splitlines() if "the resume is exact" in line]
    assert lines == ["dlm: the resume is exact: the batch of every step is a function of (trainer.seed, step, rank) "
                     "(dlm/train/data_module.py), so steps 12+ see the data they would have seen"], lines
