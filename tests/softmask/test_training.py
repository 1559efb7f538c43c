"""Soft-masking training: the two-pass loss, the p_sm coin, the Lightning wiring, checkpoints and export."""

import pytest
import torch

from dlm.checkpoint import read_checkpoint
from dlm.config import ConfigError, ModelConfig, build_config
from dlm.network import Transformer
from dlm.process import Autoregressive, MaskedDiffusion
from dlm.process.schedules import LogLinearSchedule
from dlm.softmask import SoftMaskMixer, softmask_loss, softmask_nelbo
from dlm.train.callbacks import read_metrics
from dlm.train.lit_module import DiffusionLightningModule, step_seed

V, MASK = 40, 39


def batch(seed=0, B=6, L=24):
    x = torch.randint(4, MASK, (B, L), generator=torch.Generator().manual_seed(seed))
    loss_mask = torch.ones_like(x, dtype=torch.bool)
    loss_mask[:, 0] = False
    return {"input_ids": x, "loss_mask": loss_mask}


def net(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(n_layer=2, n_head=2, d_model=32, context=32, vocab_size=V))


def process():
    return MaskedDiffusion(LogLinearSchedule(1e-3), MASK)


def test_p_sm_zero_is_exactly_the_mdlm_loss():
    network, mixer = net(), SoftMaskMixer()
    for seed in range(4):
        want = process().loss(network, batch(seed), torch.Generator().manual_seed(seed))
        got, used = softmask_loss(process(), network, mixer, batch(seed), torch.Generator().manual_seed(seed), 0.0)
        assert not used and torch.equal(got.loss, want.loss)


def test_p_sm_one_always_applies_two_passes_and_differs_from_plain():
    network, mixer = net(), SoftMaskMixer(omega_s=0.9, omega_a=1.0, omega_b=-5.0)
    calls = []
    network.register_forward_hook(lambda m, args, kw, out: calls.append(kw.get("inputs_embeds") is not None),
                                  with_kwargs=True)
    plain = process().loss(network, batch(), torch.Generator().manual_seed(0))
    calls.clear()
    out, used = softmask_loss(process(), network, mixer, batch(), torch.Generator().manual_seed(0), 1.0)
    assert used and calls == [False, True]  # pass 1 on token ids, pass 2 on the soft embeddings
    assert not torch.equal(out.loss, plain.loss)


def test_gradients_reach_all_three_omegas_through_lambda_on_the_two_pass_loss():
    network, mixer = net(), SoftMaskMixer(omega_s=0.5, omega_a=1.0, omega_b=-5.0)
    out, _ = softmask_loss(process(), network, mixer, batch(), torch.Generator().manual_seed(1), 1.0)
    out.loss.backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad) and float(p.grad.abs()) > 1e-6, name
    assert network.embed.weight.grad is not None and bool(network.head.weight.grad.abs().sum() > 0)


def test_softmask_nelbo_uses_the_same_noise_and_equals_plain_at_omega_s_zero():
    network = net()
    mixer = SoftMaskMixer(omega_s=0.5)
    with torch.no_grad():
        mixer.raw_s.fill_(-float("inf"))  # w_s = 0 exactly: the soft-masked denoiser is the plain one
    want = process().nelbo(network, batch(), 3, torch.Generator().manual_seed(5))
    got = softmask_nelbo(process(), network, mixer, batch(), 3, torch.Generator().manual_seed(5))
    assert torch.equal(got.nll_sum, want.nll_sum)


def test_bad_p_sm_and_an_autoregressive_process_are_clear_errors():
    network, mixer = net(), SoftMaskMixer()
    for p_sm in (-0.1, 1.5):
        with pytest.raises(ValueError, match="p_sm"):
            softmask_loss(process(), network, mixer, batch(), None, p_sm)
    with pytest.raises(ValueError, match="masked diffusion"):
        softmask_loss(Autoregressive(), network, mixer, batch(), None, 0.5)
    for overrides, match in ((["softmask.p_sm=1.2"], "p_sm"), (["softmask.k=0"], "softmask.k"),
                             (["softmask.k=9000"], "vocabulary"), (["process=ar", "softmask.enabled=true"], "mdlm"),
                             (["softmask.omega_s=0"], "omega_s")):
        with pytest.raises(ConfigError, match=match):
            build_config(overrides)


class _Tok:
    mask_token_id = MASK


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a bare module, no Trainer
def test_disabled_softmask_training_step_is_exactly_the_mdlm_loss():
    """The Lightning step with softmask.enabled=false returns MaskedDiffusion.loss on the step's seed, bit for bit;
    enabled with p_sm = 0 gives the same numbers; enabled, the optimizer has the w group."""
    cfg = build_config(["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.context=24",
                        "trainer.ema=0"])
    cfg.model.vocab_size = V
    plain = DiffusionLightningModule(cfg, _Tok())
    cfg_sm = build_config(["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.context=24",
                           "trainer.ema=0", "softmask.enabled=true", "softmask.p_sm=0"])
    cfg_sm.model.vocab_size = V
    sm = DiffusionLightningModule(cfg_sm, _Tok())
    sm.network.load_state_dict(plain.network.state_dict())
    b = batch(3)
    got = plain.training_step(b, 0)
    want = plain.process.loss(plain.network, b, torch.Generator().manual_seed(step_seed(cfg.trainer.seed, 0, 0)))
    assert torch.equal(got, want.loss)
    assert torch.equal(sm.training_step(b, 0), want.loss)
    assert not list(plain.process.parameters()) and len(plain.configure_optimizers()["optimizer"].param_groups) == 2
    groups = sm.configure_optimizers()["optimizer"].param_groups
    assert groups[-1]["initial_lr"] == 1e-2 and groups[-1]["weight_decay"] == 0.0  # lr itself starts warmed up
    assert {id(p) for p in groups[-1]["params"]} == {id(p) for p in sm.process.mixer.parameters()}
    assert {"process.mixer.raw_s", "process.mixer.raw_a", "process.mixer.raw_b"} <= set(sm.state_dict())


SM_RUN = ("softmask.enabled=true", "softmask.omega_s=0.3", "softmask.omega_b=-6.0", "softmask.p_sm=0.5",
          "trainer.max_steps=4", "trainer.val_every=4")


@pytest.fixture(scope="module")
def sm_run(tmp_path_factory, micro_run, micro_args):
    """Continued pretraining with SM from the micro MDLM run, 4 steps (w_b = -6 so that lambda is not ~0 on
    an untrained network's high-entropy predictions and w visibly moves)."""
    from dlm.cli import main

    out = tmp_path_factory.mktemp("sm") / "run"
    assert main(["train", *micro_args(out, f"init_from={micro_run}", *SM_RUN)]) == 0
    return out


def test_softmask_training_logs_saves_and_exports_omega_and_continues_from_an_mdlm(sm_run, micro_run):
    """Continued pretraining (init_from an MDLM run) with SM: w logged every step, in the checkpoint, in the
    exported model and loaded by dlm.load."""
    import dlm

    series = read_metrics(sm_run / "logs")
    assert sorted(series["softmask/omega_s"]) == [0, 1, 2, 3] and set(series["softmask/applied"].values()) <= {0, 1}
    omega_s = [series["softmask/omega_s"][step] for step in range(4)]
    assert omega_s[0] == pytest.approx(0.3, rel=1e-5) and omega_s[-1] != omega_s[0]  # logged and learning
    ckpt = read_checkpoint(sm_run / "checkpoints" / "last.ckpt")
    state, ema = ckpt["state_dict"], ckpt["dlm"]["ema_process"]
    # The w are weights of the model: an EMA follows them as it follows the network's, and the export, the
    # evaluation and dlm.load pair EMA weights with EMA w (use_ema=False: the live ones of both).
    assert not torch.equal(ema["mixer.raw_s"], state["process.mixer.raw_s"])
    model = dlm.load(sm_run)
    ckpt_model = dlm.load(sm_run / "checkpoints" / "last.ckpt")
    live = dlm.load(sm_run / "checkpoints" / "last.ckpt", use_ema=False)
    assert torch.equal(model.softmask.raw_s.detach(), ema["mixer.raw_s"])
    assert torch.equal(ckpt_model.softmask.raw_b.detach(), ema["mixer.raw_b"])
    assert torch.equal(live.softmask.raw_s.detach(), state["process.mixer.raw_s"])
    assert model.perplexity(max_rows=2, num_t_samples=1)["softmask"]
    assert dlm.load(micro_run).softmask is None


def test_softmask_training_resumes_exactly(sm_run, micro_run, micro_args, tmp_path):
    """Stopped after 2 steps and resumed: the same p_sm coins, losses, w and weights as the uninterrupted run."""
    from dlm.config import build_config
    from dlm.train.run import train

    out = tmp_path / "resumed"
    args = micro_args(out, f"init_from={micro_run}", *SM_RUN)
    train(build_config([*args, "trainer.max_steps=2"]))
    train(build_config(args))
    a, b = read_metrics(sm_run / "logs"), read_metrics(out / "logs")
    for key in ("softmask/applied", "softmask/omega_s", "train/loss"):
        assert a[key] == b[key], key
    assert 0 < sum(a["softmask/applied"].values()) < 4  # p_sm = 0.5: both kinds of step occur
    ca, cb = read_checkpoint(sm_run / "checkpoints" / "last.ckpt"), read_checkpoint(out / "checkpoints" / "last.ckpt")
    sa, sb = ca["state_dict"], cb["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in sa.items())
    ea, eb = ca["dlm"]["ema_process"], cb["dlm"]["ema_process"]
    assert ea.keys() == eb.keys() and all(torch.equal(v, eb[k]) for k, v in ea.items())
