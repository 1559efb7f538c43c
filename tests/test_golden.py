"""Behaviour kept through refactors: tokens and NFE of every sampler, the first 20 training losses of every
process, and a checkpoint and an export written before the architecture refactor (tests/golden/)."""

import json

import pytest
import torch

from tests.golden import cases as G

GOLDEN = json.loads(G.GOLDEN.read_text())


@pytest.fixture(autouse=True)
def one_thread():
    """The numbers were recorded on one thread (a reduction's order depends on the thread count); the setting is
    restored after each test, since other tests compare runs made before and after this one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return G.models()


@pytest.mark.parametrize("case_id", sorted(G.cases()))
def test_sampling_matches_golden(models, case_id):
    assert G.run_or_refuse(models, G.cases()[case_id]) == GOLDEN["sampling"][case_id]


def test_every_golden_case_is_still_defined():
    assert sorted(G.cases()) == sorted(GOLDEN["sampling"])


@pytest.mark.parametrize("run", sorted(G.TRAIN_RUNS))
def test_training_losses_match_golden(run, tmp_path):
    got = G.train_losses(run, tmp_path)
    want = GOLDEN["training"][run]
    assert got == want


def test_legacy_files_load_and_generate_the_same(tmp_path):
    from tests.golden.record import _batch
    from dlm.pipeline import load

    for name, path in (("ckpt", G.HERE / "legacy" / "checkpoints" / "last.ckpt"), ("export", G.HERE / "legacy" / "model")):
        model = load(path)
        gen = model.generate(num_samples=2, length=24, steps=8, seed=1, softmask=True, sampler="ancestral",
                             precision="32")
        want = GOLDEN["legacy"][name]
        assert gen.tokens.tolist() == want["tokens"] and gen.nfe == want["nfe"]
        assert list(model.nelbo(_batch(model), num_t_samples=2, seed=0, precision="32")) == want["nelbo"]


def test_legacy_run_resumes(tmp_path, monkeypatch):
    """A run folder written before the refactor resumes: training continues from its last.ckpt to step 6."""
    import shutil

    from dlm.checkpoint import read_checkpoint
    from dlm.cli import main
    from tests.golden.record import LEGACY_RUN, LEGACY_TEXTS

    monkeypatch.chdir(G.HERE.parent.parent)  # the recorded data.source is relative to the repository root
    run = tmp_path / "legacy"
    shutil.copytree(G.HERE / "legacy", run)
    args = [a for a in LEGACY_RUN if not a.startswith("trainer.max_steps")]
    assert main(["train", *args, "trainer.max_steps=6", f"data.source={LEGACY_TEXTS}", f"trainer.out_dir={run}"]) == 0
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 6
