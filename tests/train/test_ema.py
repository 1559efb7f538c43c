"""EMA weights: shadow <- decay * shadow + (1 - decay) * weights after every optimizer step, the last one included."""

import torch

from dlm.checkpoint import read_checkpoint
from dlm.config import build_config
from dlm.train.run import train


def test_ema_takes_in_every_optimizer_step_including_the_last(micro_args, tmp_path):
    """With a decay of ~0 the EMA must equal the live weights at the end; an EMA updated before the optimizer
    step (one step behind) would hold the weights of the step before the last."""
    run = tmp_path / "ema"
    train(build_config(micro_args(run, "trainer.ema=1e-12", "trainer.accumulate=2", "trainer.max_steps=5")))
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    live = {k.removeprefix("network."): v for k, v in ckpt["state_dict"].items() if k.startswith("network.")}
    ema = ckpt["dlm"]["ema"]
    assert ema.keys() == live.keys()
    for name, value in live.items():
        torch.testing.assert_close(ema[name], value.float(), rtol=0, atol=1e-9, msg=name)


def test_ema_switched_on_at_a_resume_starts_from_the_restored_weights(micro_args, tmp_path):
    run = tmp_path / "late_ema"
    train(build_config(micro_args(run, "trainer.ema=0", "trainer.max_steps=4")))
    before = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    train(build_config(micro_args(run, "trainer.ema=0.5", "trainer.max_steps=5")))
    after = read_checkpoint(run / "checkpoints" / "last.ckpt")
    ema = after["dlm"]["ema"]
    for name, value in ema.items():  # one update: 0.5 * (step-4 weights) + 0.5 * (step-5 weights)
        expected = 0.5 * before[f"network.{name}"].float() + 0.5 * after["state_dict"][f"network.{name}"].float()
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)
