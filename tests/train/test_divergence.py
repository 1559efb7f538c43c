"""A NaN loss, or a finite loss with non-finite gradients, stops training with an error naming the step; the
last good checkpoint stays intact."""

import pytest
import torch

import dlm
from dlm.checkpoint import read_checkpoint
from dlm.config import build_config
from dlm.process import MaskedDiffusion
from dlm.train.lit_module import TrainingDiverged
from dlm.train.run import train


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(micro_args, tmp_path, monkeypatch):
    loss = MaskedDiffusion.loss
    calls = []

    def nan_at_step_5(self, network, batch, generator=None, t=None, **kw):
        out = loss(self, network, batch, generator, t, **kw)
        if t is None:  # a training call (validation passes its own times)
            calls.append(1)
            if len(calls) == 6:  # steps 0..4 are fine, step 5 diverges
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MaskedDiffusion, "loss", nan_at_step_5)
    run = tmp_path / "nan"
    cfg = build_config(micro_args(run, "trainer.ckpt_every=2", "trainer.val_every=100"))
    with pytest.raises(TrainingDiverged, match=r"nan at step 5\b") as err:
        train(cfg)
    assert str(run / "checkpoints") in str(err.value)  # says where the good checkpoint is
    monkeypatch.undo()

    ckpt_dir = run / "checkpoints"
    assert not list(ckpt_dir.glob("*.tmp"))
    ckpt = read_checkpoint(ckpt_dir / "last.ckpt")
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    model = dlm.load(ckpt_dir / "last.ckpt")
    out = model.generate(num_samples=1, length=16, steps=4, seed=0)
    assert out.tokens.shape == (1, 16)


def test_non_finite_gradients_stop_before_the_weights_change(micro_args, tmp_path, monkeypatch):
    """A finite loss whose gradient is NaN (as an overflow in the backward gives): training stops at that step,
    before the optimizer step, so the checkpoint written at the next step boundary never holds NaN weights."""
    loss = MaskedDiffusion.loss
    calls = []

    def nan_gradient_at_step_3(self, network, batch, generator=None, t=None, **kw):
        out = loss(self, network, batch, generator, t, **kw)
        if t is None:
            calls.append(1)
            if len(calls) == 4:  # value 0, gradient inf * 0 = NaN
                zero = network.embed.weight.sum() * 0.0
                out.loss = out.loss + torch.sqrt(zero - zero)
                assert torch.isfinite(out.loss)
        return out

    monkeypatch.setattr(MaskedDiffusion, "loss", nan_gradient_at_step_3)
    run = tmp_path / "nan_grad"
    cfg = build_config(micro_args(run, "trainer.ckpt_every=2", "trainer.val_every=100"))
    with pytest.raises(TrainingDiverged, match=r"gradient norm is nan at step 3\b"):
        train(cfg)
    monkeypatch.undo()
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert all(torch.isfinite(v).all() for v in ckpt["dlm"]["ema"].values())
