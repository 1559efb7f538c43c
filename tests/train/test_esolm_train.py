"""`dlm train process=esolm`: trains from scratch or from an MDLM model (init_from=), resumes exactly, exports and
loads; `dlm eval --iw-orders` and `dlm sample` serve it."""

import pytest
import torch

import dlm
from dlm.cli import main
from dlm.config import build_config
from dlm.process.esolm import EsoLM
from dlm.train.run import train
from tests.train.test_resume import assert_identical_runs, last_ckpt

ESOLM = ["process=esolm", "process.alpha0=0.5"]


@pytest.fixture(scope="module")
def esolm_run(tmp_path_factory, micro_args):
    out = tmp_path_factory.mktemp("esolm") / "A"
    assert main(["train", *micro_args(out, *ESOLM)]) == 0
    return out


def test_trains_exports_and_loads(esolm_run):
    model = dlm.load(esolm_run)
    assert isinstance(model.process, EsoLM) and model.process.alpha0 == 0.5 and model.process.kappa == 0.5
    ckpt = last_ckpt(esolm_run)
    assert ckpt["global_step"] == 12 and ckpt["dlm"]["config"]["process"]["name"] == "esolm"
    same = dlm.load(esolm_run / "checkpoints" / "last.ckpt")
    assert isinstance(same.process, EsoLM) and same.process.attention == "causal"


def test_resumes_exactly(esolm_run, micro_args, tmp_path):
    run_b = tmp_path / "B"
    train(build_config(micro_args(run_b, *ESOLM, "trainer.max_steps=8")))
    train(build_config(micro_args(run_b, *ESOLM)))
    assert_identical_runs(esolm_run, run_b)


def test_starts_from_an_mdlm_model(micro_run, micro_args, tmp_path):
    """init_from= an MDLM run: the network starts from the MDLM's weights (with a vanishing lr it keeps them)."""
    run = tmp_path / "from_mdlm"
    args = [a for a in micro_args(run, *ESOLM, f"init_from={micro_run}/model", "trainer.max_steps=2", "optim.lr=1e-12",
                                  "optim.warmup_steps=0") if not a.startswith("model.")]
    train(build_config(args))
    model, start = dlm.load(run), dlm.load(micro_run / "model")
    assert isinstance(model.process, EsoLM) and model.cfg.init_from.endswith("model")
    pairs = list(zip(model.network.state_dict().values(), start.network.state_dict().values()))
    assert all(torch.allclose(a, b, atol=1e-8) for a, b in pairs)


def test_eval_reports_the_bound_and_the_importance_weighted_likelihood(esolm_run, capsys):
    model = dlm.load(esolm_run)
    ppl = model.perplexity(split="test", max_rows=2, num_t_samples=2, iw_orders=2)
    assert ppl["likelihood"] == "bound" and ppl["iw_orders"] == 2
    assert 1.0 < ppl["iw_ppl"] and ppl["iw_nll_per_token"] <= ppl["ao_nll_per_token"] + 1e-9  # log-mean-exp <= mean
    assert main(["eval", str(esolm_run), "--max-rows", "2", "--num-t-samples", "1", "--iw-orders", "2"]) == 0
    out = capsys.readouterr().out
    assert "iw ppl" in out and "ao ppl" in out
    assert main(["eval", str(esolm_run), "--iw-orders", "-1"]) == 2


def test_an_mdlm_model_gets_the_any_order_estimate_too(micro_run):
    ppl = dlm.load(micro_run).perplexity(split="test", max_rows=1, num_t_samples=1, iw_orders=1)
    assert ppl["iw_ppl"] == pytest.approx(ppl["ao_ppl"])  # one order: the two are the same number


def test_samples_with_the_first_hitting_sampler(esolm_run):
    model = dlm.load(esolm_run)
    gen = model.generate(num_samples=2, length=12, seed=0)
    assert gen.tokens.shape[0] == 2 and not bool((gen.tokens == model.process.mask_id).any())
    assert torch.equal(gen.tokens, model.generate(num_samples=2, length=12, seed=0).tokens)
