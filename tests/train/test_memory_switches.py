"""trainer.gradient_checkpointing and trainer.chunked_ce reach the network the training module builds (also for a run
started from another model's weights, init_from=) and act in its training steps; a loaded model has them off."""

import torch

import dlm.network.chunked_ce as chunked_ce
import dlm.network.transformer as transformer
from dlm.config import build_config
from dlm.pipeline import DiffusionLM
from dlm.train.run import train


def test_switches_act_in_training_and_not_after_loading(micro_args, micro_run, tmp_path, monkeypatch):
    calls = {"block": 0, "chunk": 0, "head_rows": 0}
    real_block, real_chunk = transformer.checkpoint, chunked_ce.checkpoint

    def block(fn, *args, **kw):
        calls["block"] += 1
        return real_block(fn, *args, **kw)

    def chunk(fn, head, hidden, *args, **kw):
        calls["chunk"] += 1
        calls["head_rows"] = max(calls["head_rows"], hidden.shape[0])
        return real_chunk(fn, head, hidden, *args, **kw)

    monkeypatch.setattr(transformer, "checkpoint", block)
    monkeypatch.setattr(chunked_ce, "checkpoint", chunk)
    run = tmp_path / "memory"
    train(build_config(micro_args(run, f"init_from={micro_run}", "trainer.gradient_checkpointing=true",
                                  "trainer.chunked_ce=16", "trainer.max_steps=2", "trainer.val_every=100")))
    assert calls["block"] >= 2 * 2  # 2 layers x 2 steps
    assert calls["chunk"] > 2 and calls["head_rows"] == 16  # batches of 4 x 32 tokens score more than 16 positions
    model = DiffusionLM.load(run)
    assert model.network.gradient_checkpointing is False and model.network.ce_chunk == 0
    assert all(torch.isfinite(p).all() for p in model.network.parameters())
