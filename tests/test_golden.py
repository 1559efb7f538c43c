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
    """Tokens and NFE exactly: a token is an argmax or a sampled index, so a one-ulp difference flips it only at
    a near-tie. None flips on the CPUs measured: all 69 cases match bit for bit on the recording machine and on a
    2-core AMD EPYC with AVX2 only (no AVX-512, no AMX)."""
    assert G.run_or_refuse(models, G.cases()[case_id]) == GOLDEN["sampling"][case_id]


def test_every_golden_case_is_still_defined():
    assert sorted(G.cases()) == sorted(GOLDEN["sampling"])


# Relative tolerance of the training-loss goldens. The losses were recorded in float32 on one CPU; another CPU's
# kernels (AVX2, AVX-512, AMX: 8, 16 or tile-wide lanes) sum the same numbers in another order. One float32 rounding
# is at most u = 2**-24 = 6.0e-8 relative; a reordered sum of n terms moves by at most about log2(n) * u when the
# kernels reduce pairwise or lane-wise (n <= 4 * 32 * 2 = 256 token losses per logged value: 8 levels), and the
# mean's division and the mask weighting add a few roundings more: 16u = 9.5e-7, rounded up to 1e-6. Measured
# on a 2-core AMD EPYC (AVX2 only) against the recorded values: the largest difference is 8.7e-8 (one ulp, in 6
# of 100 logged losses; the validation NLLs are equal bit for bit). A real change is far outside it: a learning
# rate 0.1% higher moves the mdlm losses by up to 9.3e-6 (test_golden_check_fails_on_a_real_change).
LOSS_RTOL = 1e-6


def loss_mismatches(got: dict, want: dict, rtol: float = LOSS_RTOL) -> list[str]:
    """The logged values of `got` that differ from `want` by more than `rtol` relative (or are missing)."""
    bad = []
    for key in sorted(set(got) | set(want)):
        g, w = got.get(key, {}), want.get(key, {})
        if g.keys() != w.keys():
            bad.append(f"{key}: logged steps {sorted(g)} != {sorted(w)}")
            continue
        bad += [f"{key}[{step}]: {g[step]!r} != {w[step]!r}" for step in w
                if not abs(g[step] - w[step]) <= rtol * abs(w[step])]  # NaN is a mismatch
    return bad


@pytest.mark.parametrize("run", sorted(G.TRAIN_RUNS))
def test_training_losses_match_golden(run, tmp_path):
    """The first 20 training losses and the validation NLLs of each process, within LOSS_RTOL (see above)."""
    got = G.train_losses(run, tmp_path)
    assert loss_mismatches(got, GOLDEN["training"][run]) == []


def test_golden_check_fails_on_a_real_change(tmp_path, monkeypatch):
    """The tolerance still sees a change of the optimization: the mdlm run with a learning rate 0.1% higher
    (3.003e-4 for 3e-4) does not match the recorded mdlm losses."""
    monkeypatch.setitem(G.TRAIN_RUNS, "mdlm_lr", ["optim.lr=3.003e-4"])
    got = G.train_losses("mdlm_lr", tmp_path)
    assert len(loss_mismatches(got, GOLDEN["training"]["mdlm"])) >= 10


def test_loss_mismatches_on_made_up_values():
    want = {"train/loss": {"0": 4.0, "1": 5.0}}
    assert loss_mismatches({"train/loss": {"0": 4.0 * (1 + 5e-7), "1": 5.0}}, want) == []
    assert loss_mismatches({"train/loss": {"0": 4.0 * (1 + 2e-6), "1": 5.0}}, want) != []
    assert loss_mismatches({"train/loss": {"0": 4.0}}, want) != []  # a step not logged
    assert loss_mismatches({"train/loss": {"0": 4.0, "1": float("nan")}}, want) != []


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
