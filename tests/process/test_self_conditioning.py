"""Self-conditioning (dlm/process/self_conditioning.py) and the feedback hook (dlm/process/feedback.py): the
maths against first principles, the p_sc coin, sampling with feedback, combining it with soft-masking, and the
projection going through training, EMA, the checkpoint and the export like any process parameter."""

import pytest
import torch
import torch.nn.functional as F

from dlm.config import build_config
from dlm.process import MaskedDiffusion, ModelDescription, make_process
from dlm.process.feedback import CombinedFeedback, combine, first_pass_rows, second_pass_inputs
from dlm.process.schedules import LogLinearSchedule
from dlm.process.self_conditioning import SelfConditionedDiffusion, SelfConditioningConfig, SelfConditioningFeedback
from dlm.softmask import SoftMaskFeedback, SoftMaskMixer
from dlm.softmask.process import SoftMaskedDiffusion

V, MASK, C = 40, 39, 32


def batch(seed=0, B=4, L=24):
    x = torch.randint(4, MASK, (B, L), generator=torch.Generator().manual_seed(seed))
    loss_mask = torch.ones_like(x, dtype=torch.bool)
    loss_mask[:, 0] = False
    return {"input_ids": x, "loss_mask": loss_mask}


def sc(p_sc=1.0, scale=0.0, seed=0) -> SelfConditionedDiffusion:
    """The process for the toy model (width C); its projection W is zero, or random with std `scale`."""
    process = make_process(SelfConditioningConfig(p_sc=p_sc), ModelDescription(vocab_size=V, d_model=C, mask_id=MASK))
    if scale:
        with torch.no_grad():
            process.projection.weight.copy_(torch.randn(C, C, generator=torch.Generator().manual_seed(seed)) * scale)
    return process


def plain() -> MaskedDiffusion:
    return MaskedDiffusion(LogLinearSchedule(1e-3), MASK)


def noised(process, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(b["input_ids"].shape[0], generator=g)
    return process.add_noise(b["input_ids"], t, b["loss_mask"], g), t


def test_with_a_zero_projection_the_self_conditioned_loss_is_the_plain_loss_exactly(tiny_network):
    net = tiny_network(V)
    for seed in range(3):  # p_sc = 1 draws no coin: the same t and z_t as MDLM
        want = plain().loss(net, batch(seed), torch.Generator().manual_seed(seed))
        got = sc(1.0).loss(net, batch(seed), torch.Generator().manual_seed(seed))
        assert torch.equal(got.loss, want.loss)
    want = plain().nelbo(net, batch(), 3, torch.Generator().manual_seed(5))
    assert torch.equal(sc(0.5).nelbo(net, batch(), 3, torch.Generator().manual_seed(5)).nll_sum, want.nll_sum)
    z, t = noised(plain(), batch())
    inputs = second_pass_inputs(sc(1.0), net, batch(), z, t, None)
    assert torch.equal(inputs, net.embed_tokens(z))  # E[z] + 0: the forward equals the one on token ids


def test_the_second_pass_input_is_the_embedding_plus_the_projected_expected_embedding(tiny_network):
    """First principles: e = E[z] + W (softmax(SUBS logits of the first pass) @ E) at masks, E[z] elsewhere."""
    net, process, b = tiny_network(V), sc(1.0, scale=0.2), batch()
    z, t = noised(process, b)
    masked = z == MASK
    with torch.no_grad():
        logits = net(z)  # (B, L, V): the first pass on every position
    E, W = net.embed.weight.detach(), process.projection.weight.detach()
    want = E[z].clone()
    for bi, li in masked.nonzero().tolist():
        p = logits[bi, li].clone()
        p[MASK] = float("-inf")
        want[bi, li] += W @ (p.softmax(-1) @ E)
    got = second_pass_inputs(process, net, b, z, t, None)
    assert masked.any() and (~masked).any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[~masked], E[z][~masked])  # clean positions are untouched


def test_the_projection_learns_from_zero_and_the_first_pass_gets_no_gradient(tiny_network):
    net, process = tiny_network(V).train(), sc(1.0)
    out = process.loss(net, batch(), torch.Generator().manual_seed(0))
    out.loss.backward()
    grad = process.projection.weight.grad
    assert grad is not None and bool(grad.abs().sum() > 0)  # zero-initialised, but it gets a gradient
    z, t = noised(process, batch())
    assert not first_pass_rows(process, net, z, t, batch()).requires_grad


def test_the_p_sc_coin_is_drawn_after_z_and_off_is_the_plain_pass(tiny_network):
    net, seen = tiny_network(V), set()
    for seed in range(8):
        process = sc(0.5, scale=0.2)
        got = process.loss(net, batch(seed), torch.Generator().manual_seed(seed))
        want = plain().loss(net, batch(seed), torch.Generator().manual_seed(seed))
        seen.add(process.last_applied)
        assert torch.equal(got.loss, want.loss) != process.last_applied  # same t and z_t; differs iff applied
        assert process.log_values() == {"self_conditioning/applied": float(process.last_applied)}
    assert seen == {True, False}
    process = sc(0.0, scale=0.2)
    assert torch.equal(process.loss(net, batch(), torch.Generator().manual_seed(1)).loss,
                       plain().loss(net, batch(), torch.Generator().manual_seed(1)).loss)


def test_sampling_feedback_feeds_the_previous_prediction(tiny_network):
    net, process = tiny_network(V), sc(scale=0.2)
    z = torch.full((2, 6), MASK)
    z[:, :2] = torch.tensor([[1, 2], [3, 4]])
    logits = torch.randn(2, 6, V, generator=torch.Generator().manual_seed(0))
    fb = process.feedback()
    got = fb(net, z, logits, z != MASK, torch.ones(2))
    E, W = net.embed.weight.detach(), process.projection.weight.detach()
    p = logits.clone()
    p[..., MASK] = float("-inf")
    want = torch.where((z == MASK)[..., None], E[z] + (p.softmax(-1) @ E) @ W.T, E[z])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fb(net, torch.ones(2, 6, dtype=torch.long), logits, None, torch.zeros(2)) is None  # nothing masked
    with pytest.raises(ValueError, match="no sampling options"):
        process.feedback(omega_s=0.5)


def test_combined_feedback_is_the_soft_mask_embedding_plus_the_self_conditioning_projection(tiny_network):
    net, process = tiny_network(V), sc(scale=0.2)
    mixer = SoftMaskMixer(k=3, omega_s=0.6, omega_a=1.0, omega_b=-8.0)
    sm, scf = SoftMaskFeedback(mixer, MASK, schedule="linear"), process.feedback()
    both = combine(sm, None, scf)
    assert isinstance(both, CombinedFeedback) and both.label == "soft-masking + self-conditioning"
    assert combine(None, sm) is sm and combine() is None and combine(both, None).parts == [sm, scf]
    z = torch.full((2, 6), MASK)
    z[:, :2] = 5
    logits = torch.randn(2, 6, V, generator=torch.Generator().manual_seed(1))
    masks_left = torch.tensor([1.0, 0.5])
    got = both(net, z, logits, z != MASK, masks_left)
    assert torch.equal(got, sm(net, z, logits, z != MASK, masks_left) + scf.offset(net, z, logits, None, None))
    rows = logits[z == MASK]
    assert torch.equal(both.train_inputs(net, z, rows),
                       sm.train_inputs(net, z, rows) + scf.delta(net, z, rows))


def test_soft_masking_on_a_self_conditioned_process_trains_both(tiny_network):
    cfg = build_config(["process=mdlm_sc", "process.p_sc=1.0", "softmask.enabled=true", "softmask.p_sm=1.0",
                        "model.d_model=32", "data.vocab_size=300"])
    cfg.model.vocab_size = V
    from dlm.build import build_process

    process = build_process(cfg, MASK)
    assert isinstance(process, SoftMaskedDiffusion) and isinstance(process.plain, SelfConditionedDiffusion)
    assert process.feedback().label == "soft-masking + self-conditioning"
    assert process.plain.feedback().label == "self-conditioning"
    net = tiny_network(V).train()
    process.loss(net, batch(), torch.Generator().manual_seed(0)).loss.backward()
    assert process.mixer.raw_s.grad is not None and bool(process.plain.projection.weight.grad.abs().sum() > 0)
    grouped = {id(p) for g in process.optimizer_groups() for p in g["params"]}
    assert grouped == {id(p) for p in process.parameters()}
    assert process.log_values()["self_conditioning/applied"] == 1.0 and process.log_values()["softmask/applied"] == 1.0


def test_a_process_built_without_the_width_is_refused():
    with pytest.raises(ValueError, match="width"):
        make_process(SelfConditioningConfig(), MASK)
    with pytest.raises(ValueError, match="p_sc"):
        make_process(SelfConditioningConfig(p_sc=1.5), ModelDescription(vocab_size=V, d_model=C, mask_id=MASK))


# ------------------------------------------------------------------------------------------ through DiffusionLM
def model(process_name="mdlm_sc", scale=0.0, softmask=False):
    """A DiffusionLM on the golden test's 300-token tokenizer with a random network (float32)."""
    from dlm.build import build_process
    from dlm.pipeline import DiffusionLM
    from tests.golden.cases import network, tokenizer

    tok = tokenizer()
    overrides = [f"process={process_name}", "model.n_layer=2", "model.n_head=2", "model.d_model=32",
                 "model.context=32", "data.vocab_size=300"] + (["softmask.enabled=true"] if softmask else [])
    cfg = build_config(overrides)
    cfg.model.vocab_size = len(tok)
    process = build_process(cfg, tok.mask_token_id)
    if softmask:
        process = SoftMaskedDiffusion(process.plain, SoftMaskMixer(3, 0.6, 1.0, -8.0))
    if scale:
        with torch.no_grad():
            torch.manual_seed(7)
            process.plain.projection.weight.normal_(0.0, scale)
    return DiffusionLM(network(len(tok), 0), process, tok, cfg)


SAMPLERS = ["ancestral", "first_hitting", "remdm_cap", "remdm_loop", "llada", "uniform_ancestral"]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_generate_attaches_self_conditioning_by_default(sampler):
    kw = dict(num_samples=2, length=24, prompt="And the king", sampler=sampler, seed=3, precision="32")
    kw.update({"gen_length": 16, "length": None, "block_length": 4} if sampler == "llada" else {})
    kw.update({} if sampler == "first_hitting" else {"steps": 8})
    zero, strong = model(), model(scale=0.5)
    assert zero.feedback_for().label == "self-conditioning" and zero.feedback_for(feedback=False) is None
    plain_run = zero.generate(feedback=False, **kw)
    same = zero.generate(**kw)  # W = 0: fed E[z] exactly, so the same tokens and calls as plain inputs
    assert same.tokens.tolist() == plain_run.tokens.tolist() and same.nfe == plain_run.nfe
    fed = strong.generate(**kw)
    assert fed.tokens.tolist() != strong.generate(feedback=False, **kw).tokens.tolist()
    assert fed.tokens.tolist() == strong.generate(**kw).tokens.tolist()  # deterministic


def test_generate_softmask_switches_on_a_self_conditioned_soft_masking_model():
    m = model(scale=0.5, softmask=True)
    assert m.feedback_for().label == "soft-masking + self-conditioning"
    assert m.feedback_for(softmask=False).label == "self-conditioning"
    assert m.feedback_for(softmask=dict(omega_s=0.3)).parts[0].omegas()["omega_s"] == 0.3
    kw = dict(num_samples=2, length=24, sampler="ancestral", steps=8, seed=1, precision="32")
    runs = {name: m.generate(**kw, **extra).tokens.tolist() for name, extra in
            (("default", {}), ("sm", {"softmask": True}), ("no_sm", {"softmask": False}),
             ("none", {"feedback": False}))}
    assert runs["default"] == runs["sm"] and len({str(v) for v in runs.values()}) == 3
    with pytest.raises(ValueError, match="not both"):
        m.generate(softmask=True, feedback=False, **kw)


def test_a_sampler_without_feedback_is_refused_for_a_model_sampled_with_it():
    from dlm.sampler.base import Sampler

    class Plain(Sampler):
        name = "plain_test"

    m = model()
    with pytest.raises(ValueError, match="does not take feedback"):
        m.generate(length=16, sampler=Plain())


def test_the_projection_is_trained_emad_saved_exported_and_sampled_with(micro_args, tmp_path, capsys):
    import dlm
    from dlm.checkpoint import read_checkpoint
    from dlm.cli import main

    out = tmp_path / "sc"
    assert main(["train", *micro_args(out, "process=mdlm_sc", "trainer.max_steps=4", "optim.warmup_steps=0",
                                      "optim.lr=1e-2")]) == 0
    ckpt = read_checkpoint(out / "checkpoints" / "last.ckpt")
    live = ckpt["state_dict"]["process.projection.weight"]
    ema = ckpt["dlm"]["ema_process"]["projection.weight"]
    assert live.shape == (64, 64) and bool(live.abs().sum() > 0) and not torch.equal(ema, live)
    exported, from_ckpt = dlm.load(out), dlm.load(out / "checkpoints" / "last.ckpt", use_ema=False)
    assert isinstance(exported.process, SelfConditionedDiffusion)
    assert torch.equal(exported.process.projection.weight.detach(), ema)
    assert torch.equal(from_ckpt.process.projection.weight.detach(), live)
    capsys.readouterr()
    assert main(["sample", str(out), "--num-samples", "1", "--steps", "4", "--length", "16",
                 "--sampler", "ancestral"]) == 0
    assert "self-conditioning" in capsys.readouterr().out
    assert main(["sample", str(out), "--num-samples", "1", "--steps", "4", "--length", "16", "--no-feedback"]) == 0
    assert "self-conditioning" not in capsys.readouterr().out


def test_a_sampler_given_with_its_own_feedback_keeps_it():
    from dlm.process.feedback import InputFeedback
    from dlm.sampler import make_sampler

    class Spy(InputFeedback):
        calls = 0

        def __call__(self, network, z, logits, fixed, masks_left):
            Spy.calls += 1
            return None

    m = model(scale=0.5)
    m.generate(length=16, sampler=make_sampler("ancestral", steps=4, feedback=Spy()), precision="32")
    assert Spy.calls > 0
    with pytest.raises(ValueError, match="not both"):
        m.generate(length=16, feedback=Spy(), softmask=True)


def test_diffusiongemma_form_starts_plain_and_then_feeds_the_block(tiny_network):
    """process.form=geglu (DiffusionGemma's block, shared with udlm/gidd): zero down projection = plain MDLM
    exactly (loss, bound and sampling inputs); a trained-looking block changes the second pass at the masks only,
    where the input keeps E[z]'s RMS."""
    net = tiny_network(V)
    geglu = make_process(SelfConditioningConfig(p_sc=1.0, form="geglu"),
                         ModelDescription(vocab_size=V, d_model=C, mask_id=MASK))
    for seed in range(2):
        want = plain().loss(net, batch(seed), torch.Generator().manual_seed(seed))
        assert torch.equal(geglu.loss(net, batch(seed), torch.Generator().manual_seed(seed)).loss, want.loss)
    z, t = noised(plain(), batch())
    assert torch.equal(second_pass_inputs(geglu, net, batch(), z, t, None), net.embed_tokens(z))
    with torch.no_grad():
        geglu.projection.down.weight.normal_(0.0, 0.5)
    got = second_pass_inputs(geglu, net, batch(), z, t, None)
    plain_inputs = net.embed_tokens(z)
    masked = z == MASK
    assert torch.equal(got[~masked], plain_inputs[~masked]) and not torch.allclose(got[masked], plain_inputs[masked])
    norm = lambda e: e.pow(2).mean(-1).add(1e-6).sqrt()  # noqa: E731
    assert torch.allclose(norm(got[masked]), norm(plain_inputs[masked]), rtol=1e-4)
    with pytest.raises(ValueError, match="process.form='cubic' must be"):
        make_process(SelfConditioningConfig(form="cubic"), ModelDescription(vocab_size=V, d_model=C, mask_id=MASK))
