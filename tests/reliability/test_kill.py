"""kill -9 at named points and at random moments of a micro run with gradient accumulation 2 and soft-masking; the
run restarted with the same command each time ends bit-identical to an uninterrupted one: weights, EMA (network
and w), optimizer state, best.ckpt, and every logged CSV value, each step exactly once (scripts/kill_campaign.py).
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from dlm.checkpoint import read_checkpoint
from dlm.config import build_config
from dlm.train.durable import truncate_logs
from dlm.train.run import train

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("kill_campaign", REPO / "scripts" / "kill_campaign.py")
kill_campaign = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kill_campaign)


def test_kill_9_campaign_with_accumulation_and_softmask_is_bit_identical(tmp_path):
    # Two kills right after a checkpoint rename in a row (the old failure: a resumed run re-saved last.ckpt inside
    # its first accumulation window), a kill between the tokenizer's files and their rename, one between the first
    # checkpoint's temp file and its rename (rows logged, no checkpoint yet: the restart logs them again, once),
    # and random moments (scripts/kill_campaign.py runs many more).
    schedule = ["point:tokenizer_written:1", "point:checkpoint_written:1", "point:checkpoint_renamed:1",
                "point:checkpoint_renamed:1", "random", "random"]
    r = kill_campaign.campaign(kills=len(schedule), seed=int(os.environ.get("DLM_KILL_SEED", "0")), steps=12,
                               accumulate=2, softmask=True, work=tmp_path, schedule=schedule, verbose=False)
    assert r["kills"] == len(schedule) and r["resumes"] >= 3
    assert r["identical"], r["diffs"]
    ckpt = read_checkpoint(tmp_path / "victim" / "checkpoints" / "last.ckpt")
    assert ckpt["dlm"]["ema_process"]  # the soft-masking w and their EMA were compared too
    assert not list((tmp_path / "victim").rglob("*.tmp"))


def test_compare_sees_a_one_ulp_difference_and_a_lost_row(micro_run, tmp_path):
    """The campaign's verdict can fail: a weight off by one ulp, or one CSV row gone, is reported."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(micro_run, copy)
    assert kill_campaign.compare(micro_run, copy) == []
    ckpt = torch.load(copy / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    w = ckpt["state_dict"]["network.head.weight"]
    w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(1e9))
    torch.save(ckpt, copy / "checkpoints" / "last.ckpt")
    truncate_logs(copy / "logs", 11)  # the row of step 11 (and its validation) is lost
    diffs = kill_campaign.compare(micro_run, copy)
    assert any("network.head.weight" in d for d in diffs) and any("rows lost" in d for d in diffs)


def test_a_resumed_run_does_not_checkpoint_inside_its_first_accumulation_window(micro_args, tmp_path):
    """The mechanism behind the drift: resumed at step 8 (a checkpoint step) with accumulate=2, the next
    last.ckpt must be at an optimizer-step boundary (micro-batches = 2 x steps), not a re-save of step 8 after
    one micro-batch."""
    from dlm.checkpoint import AtomicCheckpointIO

    run = tmp_path / "acc"
    args = micro_args(run, "trainer.accumulate=2", "trainer.val_every=100")
    train(build_config([*args, "trainer.max_steps=8"]))
    saved = []
    original = AtomicCheckpointIO.save_checkpoint

    def record(self, checkpoint, path, storage_options=None):
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
        saved.append((Path(path).name, checkpoint["global_step"], progress["processed"]))
        return original(self, checkpoint, path, storage_options)

    AtomicCheckpointIO.save_checkpoint = record
    try:
        train(build_config(args))
    finally:
        AtomicCheckpointIO.save_checkpoint = original
    assert saved and all(micro == 2 * step for _, step, micro in saved), saved
    assert [step for name, step, _ in saved if name == "last.ckpt"] == [12], saved  # not step 8 again; 12 once


def test_the_final_validation_and_best_ckpt_come_before_the_last_checkpoint(micro_args, tmp_path):
    """A validated checkpoint step writes best.ckpt and the validation row before last.ckpt, so a kill after
    last.ckpt never leaves best.ckpt stale or the final validation skipped."""
    from dlm.checkpoint import AtomicCheckpointIO
    from dlm.train.callbacks import read_metrics

    run = tmp_path / "val"
    order = []
    original = AtomicCheckpointIO.save_checkpoint

    def record(self, checkpoint, path, storage_options=None):
        logged = read_metrics(run / "logs")
        order.append((Path(path).name, checkpoint["global_step"], sorted(logged.get("val/ppl", {})),
                      max(logged.get("train/loss", {-1: 0}))))
        return original(self, checkpoint, path, storage_options)

    AtomicCheckpointIO.save_checkpoint = record
    try:
        train(build_config(micro_args(run, "trainer.ckpt_every=6")))
    finally:
        AtomicCheckpointIO.save_checkpoint = original
    assert [(name, step) for name, step, _, _ in order] == [("best.ckpt", 6), ("last.ckpt", 6), ("best.ckpt", 12),
                                                            ("last.ckpt", 12)], order
    # when last.ckpt of step k is written, the rows of every step before k are on disk (validation of k: step k-1)
    assert order[1][2:] == ([5], 5) and order[3][2:] == ([5, 11], 11)


def test_the_row_of_a_checkpoint_step_is_on_disk_before_the_checkpoint(micro_args, tmp_path):
    from dlm.checkpoint import AtomicCheckpointIO
    from dlm.train.callbacks import read_metrics

    run = tmp_path / "rows"
    seen = []
    original = AtomicCheckpointIO.save_checkpoint

    def record(self, checkpoint, path, storage_options=None):
        if Path(path).name == "last.ckpt":
            seen.append((checkpoint["global_step"], max(read_metrics(run / "logs")["train/loss"])))
        return original(self, checkpoint, path, storage_options)

    AtomicCheckpointIO.save_checkpoint = record
    try:
        train(build_config(micro_args(run, "trainer.val_every=100", "trainer.max_steps=8")))
    finally:
        AtomicCheckpointIO.save_checkpoint = original
    assert seen == [(4, 3), (8, 7)], seen
    rows = read_metrics(run / "logs")["train/loss"]
    assert sorted(rows) == list(range(8))
    import csv

    steps = [int(r["step"]) for r in csv.DictReader(open(next((run / "logs").glob("*/metrics.csv"))))
             if r.get("train/loss")]
    assert steps == list(range(8))  # each once (the checkpoint logs it early; Lightning's copy is dropped)


def test_truncate_logs_drops_later_steps_and_a_half_written_row(tmp_path):
    part = tmp_path / "logs" / "part-000"
    part.mkdir(parents=True)
    (part / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.5\n0,1,1.25\n0,2,1.0\n0,3,0.")
    assert truncate_logs(tmp_path / "logs", 2) == 2
    assert (part / "metrics.csv").read_text().splitlines() == ["epoch,step,train/loss", "0,0,1.5", "0,1,1.25"]


@pytest.mark.parametrize("accumulate", [2])
def test_stop_at_a_checkpoint_then_resume_twice_is_exact(micro_args, tmp_path, accumulate):
    """In-process: stop at step 6 and 9, resume each time: equal to one uninterrupted run."""
    args = [f"trainer.accumulate={accumulate}", "softmask.enabled=true"]
    a, b = tmp_path / "a", tmp_path / "b"
    train(build_config(micro_args(a, *args)))
    for steps in (6, 9, 12):  # stops at a validated step, at a checkpoint step and at neither
        train(build_config(micro_args(b, *args, f"trainer.max_steps={steps}")))
    assert kill_campaign.compare(a, b) == []
