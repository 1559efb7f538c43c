"""trainer.compile=true compiles the network in place: EMA, checkpoints and the export keep the plain names."""

import torch

import dlm
from dlm.checkpoint import read_checkpoint
from dlm.config import build_config
from dlm.train.run import train


def test_compiled_training_with_ema_checkpoints_and_export(micro_args, tmp_path, monkeypatch):
    compile_module = torch.nn.Module.compile
    compiled = []

    def eager_compile(self, *args, **kw):  # Dynamo's tracing without Inductor's C++ build (minutes on a CPU)
        compiled.append(type(self).__name__)
        return compile_module(self, *args, **{**kw, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", eager_compile)
    run = tmp_path / "compiled"
    train(build_config(micro_args(run, "trainer.compile=true", "trainer.max_steps=4")))
    assert compiled == ["Transformer"]
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert not [k for k in ckpt["state_dict"] if "_orig_mod" in k]
    names = {k.removeprefix("network.") for k in ckpt["state_dict"] if k.startswith("network.")}
    assert "embed.weight" in ckpt["dlm"]["ema"] and set(ckpt["dlm"]["ema"]) <= names
    model = dlm.load(run / "model")
    assert model.generate(num_samples=1, length=16, steps=4).tokens.shape == (1, 16)
