"""Exact resume: a run stopped (cleanly, or killed with SIGKILL) and restarted with the same command ends
bit-identical to the uninterrupted run A (the `micro_run` fixture): weights, EMA, optimizer state, logged losses."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dlm.checkpoint import AtomicCheckpointIO, CheckpointError, read_checkpoint
from dlm.config import ConfigError, build_config
from dlm.train.callbacks import read_metrics
from dlm.train.run import train

REPO = Path(__file__).resolve().parents[2]


def last_ckpt(run: Path) -> dict:
    return read_checkpoint(run / "checkpoints" / "last.ckpt")


def assert_identical_runs(a: Path, b: Path) -> None:
    ca, cb = last_ckpt(a), last_ckpt(b)
    assert ca["global_step"] == cb["global_step"] == 12
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k
    ema_a, ema_b = ca["dlm"]["ema"], cb["dlm"]["ema"]
    assert ema_a and ema_a.keys() == ema_b.keys()
    for k, v in ema_a.items():
        assert torch.equal(v, ema_b[k]), f"EMA {k}"
    opt_a, opt_b = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for name, v in opt_a[i].items():
            assert torch.equal(v, opt_b[i][name]), f"optimizer state {i}/{name}"
    loss_a, loss_b = read_metrics(a / "logs")["train/loss"], read_metrics(b / "logs")["train/loss"]
    assert [loss_b[s] for s in range(8, 12)] == [loss_a[s] for s in range(8, 12)]
    assert not list((b / "checkpoints").glob("*.tmp"))


def test_stop_at_8_then_resume_to_12_equals_uninterrupted(micro_run, micro_args, tmp_path):
    run_b = tmp_path / "B"
    train(build_config(micro_args(run_b, "trainer.max_steps=8")))
    assert last_ckpt(run_b)["global_step"] == 8
    train(build_config(micro_args(run_b)))  # the same command as run A: resumes from last.ckpt
    assert_identical_runs(micro_run, run_b)
    # The resumed part logs beside the first part instead of overwriting it: the whole history is readable.
    loss_a, loss_b = read_metrics(micro_run / "logs")["train/loss"], read_metrics(run_b / "logs")["train/loss"]
    assert loss_b == loss_a and sorted(loss_b) == list(range(12))


# A wrapper around `dlm train` that parks the training loop at a given step until it is killed. It only stops the
# clock at a known point (after the step-8 checkpoint, with two more steps done and lost); the library is unchanged.
PARK = textwrap.dedent("""
    import os, sys, time
    import dlm.train.lit_module as lit

    _step = lit.DiffusionLightningModule.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step >= int(os.environ["PARK_AT_STEP"]):
            open(os.environ["PARK_MARKER"], "w").close()
            time.sleep(600)
        return _step(self, batch, batch_idx)

    lit.DiffusionLightningModule.training_step = training_step

    if __name__ == "__main__":
        from dlm.cli import main
        sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_mid_run_then_restart_equals_uninterrupted(micro_run, micro_args, tmp_path):
    run_c = tmp_path / "C"
    wrapper, marker, log = tmp_path / "park.py", tmp_path / "parked", tmp_path / "train.log"
    wrapper.write_text(PARK)
    env = {**os.environ, "PARK_AT_STEP": "10", "PARK_MARKER": str(marker)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(wrapper), "train", *micro_args(run_c)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not marker.exists():
                assert proc.poll() is None, f"training ended before step 10:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "training did not reach step 10 in 240 s"
                time.sleep(0.1)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt_dir = run_c / "checkpoints"
    assert not list(ckpt_dir.glob("*.tmp"))  # no half-written file, and last.ckpt is whole
    assert last_ckpt(run_c)["global_step"] == 8
    assert not (run_c / "model").exists()  # the run never finished

    train(build_config(micro_args(run_c)))  # restart: the same command
    assert_identical_runs(micro_run, run_c)


def test_atomic_checkpoint_survives_a_failed_write(micro_run, tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous checkpoint intact and no temporary file behind."""
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    good = last_ckpt(micro_run)
    io.save_checkpoint(good, path)
    before = path.read_bytes()

    def dying_save(obj, f, *args, **kw):
        f.write(before[: len(before) // 2])  # half of a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(CheckpointError,
                       match=r"no space left on device: need ~[\d.]+ [KMG]B free for an atomic checkpoint"):
        io.save_checkpoint(good, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))
    assert io.load_checkpoint(path)["global_step"] == good["global_step"]


def test_time_budget_stops_early_is_kept_on_rerun_and_resumes_exactly(micro_run, micro_args, tmp_path, capsys,
                                                                      recwarn):
    """trainer.max_minutes stops a run at a step boundary and saves it; the same command again trains nothing
    (the budget is spent, summed over resumes); without the budget it continues to the uninterrupted result."""
    from dlm.train.run import training_minutes

    run_b = tmp_path / "B"
    budget = "trainer.max_minutes=0.0002"  # 12 ms: spent by the first step
    train(build_config(micro_args(run_b, budget)))
    first = last_ckpt(run_b)
    assert 1 <= first["global_step"] < 12 and training_minutes(first) >= 0.0002
    assert "stopped by trainer.max_minutes=0.0002" in capsys.readouterr().out
    assert (run_b / "model").is_dir()  # exported like a finished run
    train(build_config(micro_args(run_b, budget)))
    assert "has used its trainer.max_minutes=0.0002 budget" in capsys.readouterr().out
    assert last_ckpt(run_b)["global_step"] == first["global_step"]  # no step was added
    train(build_config(micro_args(run_b)))  # no budget: on to max_steps, exactly as if never stopped
    assert_identical_runs(micro_run, run_b)
    # Every run keeps its Timer, so resuming without the budget finds the callback the checkpoint was made with.
    assert not [w for w in recwarn if "Timer" in str(w.message)]
    assert training_minutes(last_ckpt(run_b)) > training_minutes(first)
    assert "12 of 12, " in capsys.readouterr().out  # the closing line: steps and training time in all


def test_every_run_records_its_training_time(micro_run):
    from dlm.train.run import training_minutes

    assert training_minutes(last_ckpt(micro_run)) > 0


def test_time_budget_with_gradient_accumulation_stops_between_optimizer_steps(micro_args, tmp_path):
    """The budget is looked at only after an optimizer step: a run stopped by it is at a window boundary and
    resumes to exactly the uninterrupted run (stopping inside a window would shift every later window)."""
    accumulate = "trainer.accumulate=2"
    run_a, run_b = tmp_path / "A2", tmp_path / "B2"
    train(build_config(micro_args(run_a, accumulate)))
    train(build_config(micro_args(run_b, accumulate, "trainer.max_minutes=0.0002")))  # spent by the first micro-batch
    stopped = last_ckpt(run_b)
    micro_batches = stopped["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
    assert 1 <= stopped["global_step"] < 12 and micro_batches == 2 * stopped["global_step"]
    train(build_config(micro_args(run_b, accumulate)))
    assert_identical_runs(run_a, run_b)


@pytest.mark.parametrize("override", ["trainer.batch_size=8", "trainer.accumulate=2", "trainer.seed=5",
                                      "trainer.devices=2", "optim.lr=0.01", "optim.decay=cosine"])
def test_resume_refuses_what_would_change_the_restored_state_or_the_data_order(micro_run, micro_args, tmp_path,
                                                                               override):
    run = tmp_path / "copy"
    shutil.copytree(micro_run, run)
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"trained with {key}=.* but this run asks for '?{value}"):
        train(build_config(micro_args(run, override, "trainer.max_steps=14")))
    assert last_ckpt(run)["global_step"] == 12  # nothing was trained


def test_a_larger_max_steps_on_resume_stretches_the_schedule(micro_args, tmp_path):
    """The schedule is restored with the total the run started with; raised max_steps, it follows the new total."""
    from dlm.train.lit_module import LRSchedule

    run = tmp_path / "cos"
    schedule = ["optim.decay=cosine", "optim.warmup_steps=2", "optim.lr=0.001"]
    train(build_config(micro_args(run, *schedule, "trainer.max_steps=6")))
    train(build_config(micro_args(run, *schedule, "trainer.max_steps=10")))
    ckpt = last_ckpt(run)
    assert ckpt["global_step"] == 10 and ckpt["lr_schedulers"][0]["lr_lambdas"][0]["total"] == 10
    expected = 0.001 * LRSchedule(2, 10, "cosine", 0.1)(10)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(expected)


def test_a_continued_training_run_resumes_with_the_same_command(micro_run, micro_args, tmp_path):
    """init_from takes the network from the init model; a resume of that run keeps it (the command line's model
    preset is not the run's)."""
    run = tmp_path / "cont"
    args = [a for a in micro_args(run, f"init_from={micro_run}/model") if not a.startswith("model.")]
    train(build_config([*args, "trainer.max_steps=4"]))
    train(build_config([*args, "trainer.max_steps=8"]))
    ckpt = last_ckpt(run)
    assert ckpt["global_step"] == 8 and ckpt["dlm"]["config"]["model"]["n_layer"] == 2
