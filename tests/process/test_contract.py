"""The process contract (dlm/process/base.py), checked for every registered process and for soft-masking: a new
process is tested by being registered."""

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from dlm.build import build_process
from dlm.config import build_config
from dlm.data.batch import make_batch
from dlm.process import PROCESSES, MaskedDiffusion, MDLMConfig, Process, register_process
from dlm.process.base import LIKELIHOODS

V, L, MASK = 13, 16, 12


# ------------------------------------------------------------------------------------------ a learnable process
@dataclass
class LearnedConfig(MDLMConfig):
    name: str = "learned_test"


class _Scaled:
    """The network with its logits scaled by exp(log_scale) and shifted by the process's bias (V,)."""

    def __init__(self, network, process):
        self.network, self.process = network, process

    def __call__(self, *args, **kw):
        return self.network(*args, **kw) * self.process.log_scale.exp() + self.process.bias

    def __getattr__(self, name):
        return getattr(self.network, name)


class LearnedTemperature(MaskedDiffusion):
    """MDLM whose logits get a learned temperature (a parameter) and a fixed bias sized by the model's vocabulary
    (a buffer): a process with state of both kinds, which must be saved, EMA'd, exported, loaded and optimised
    like the network's with no special case."""

    name, config_class = "learned_test", LearnedConfig

    @classmethod
    def from_config(cls, cfg, description):
        process = super().from_config(cfg, description)
        process.log_scale = torch.nn.Parameter(torch.zeros(()))
        process.register_buffer("bias", torch.linspace(0.0, 0.1, description.vocab_size))
        return process

    def loss_at(self, network, batch, z, t, inputs_embeds=None):
        return super().loss_at(_Scaled(network, self), batch, z, t, inputs_embeds)

    def forward_logits(self, network, z, t, batch, inputs_embeds=None):
        return super().forward_logits(_Scaled(network, self), z, t, batch, inputs_embeds)


@pytest.fixture(scope="module", autouse=True)
def learned_process_registered():
    """LearnedTemperature is registered while this module's tests run (as a plugin's process would be)."""
    register_process(LearnedTemperature)
    yield
    PROCESSES.pop("learned_test")


SOFTMASK = ["softmask.enabled=true", "softmask.omega_s=0.5", "softmask.omega_b=-8.0"]


def make(name: str) -> Process:
    """The process `name` as `dlm train process=NAME` builds it ("softmask": MDLM with soft-masking; "softmask_sc":
    self-conditioned MDLM with soft-masking, both feedbacks combined)."""
    overrides = SOFTMASK if name == "softmask" else ["process=mdlm_sc", *SOFTMASK] if name == "softmask_sc" else [
        f"process={name}"]  # a registered process's preset: its YAML file if it has one, else its config's defaults
    cfg = build_config([f"model.context={L}", "model.d_model=32", "data.vocab_size=300", *overrides])  # tiny_network's
    cfg.model.vocab_size = V
    return build_process(cfg, MASK)


NAMES = sorted({*PROCESSES, "learned_test"}) + ["softmask", "softmask_sc"]
LEARNABLE = ("softmask", "softmask_sc", "learned_test", "mdlm_sc")  # the ones with parameters


def batch(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.bool)
    am[1, -3:] = False  # one padded row
    return make_batch(ids, am)


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_finite_and_differentiable(name, tiny_network):
    process, net = make(name), tiny_network(V).train()
    out = process.loss(net, batch(), torch.Generator().manual_seed(1))
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    out.loss.backward()
    grads = [p.grad for p in [*net.parameters(), *process.parameters()] if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert int(out.num_tokens) == int(batch()["loss_mask"].sum())


@pytest.mark.parametrize("name", NAMES)
def test_bound_is_non_negative_and_deterministic(name, tiny_network):
    process, net = make(name), tiny_network(V)
    a = process.nelbo(net, batch(), 2, torch.Generator().manual_seed(3))
    b = process.nelbo(net, batch(), 2, torch.Generator().manual_seed(3))
    assert float(a.nll_sum) >= 0 and torch.equal(a.nll_sum, b.nll_sum)


@pytest.mark.parametrize("name", NAMES)
def test_per_row_generators_make_a_rows_bound_independent_of_its_batch(name, tiny_network):
    process, net, full = make(name), tiny_network(V), batch(B=3)
    gens = lambda rows: [torch.Generator().manual_seed(100 + r) for r in rows]  # noqa: E731
    together = process.nelbo(net, full, 2, gens(range(3)))
    alone = sum(float(process.nelbo(net, {k: v[r:r + 1] for k, v in full.items()}, 2, gens([r])).nll_sum)
                for r in range(3))
    assert float(together.nll_sum) == pytest.approx(alone, rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_prior_and_parameterisation(name):
    process = make(name)
    canvas = torch.randint(0, MASK, (2, L))
    to_generate = torch.zeros(2, L, dtype=torch.bool)
    to_generate[:, 5:] = True
    z = process.prior(canvas, to_generate, torch.Generator().manual_seed(0))
    assert torch.equal(z[~to_generate], canvas[~to_generate])  # given positions untouched
    logits = torch.randn(2, L, V)
    if process.corruption == "absorbing":
        assert (z[to_generate] == process.mask_id).all() and torch.equal(process.is_noise(z), to_generate)
    if process.corruption == "mixed":  # [MASK] and uniform noise (GIDD): the prior is all [MASK]
        assert (z[to_generate] == process.mask_id).all()
    if process.corruption == "uniform":  # random tokens of the vocabulary
        assert bool((z[to_generate] != z[to_generate][0]).any()) and bool((z < process.vocab_size).all())
    if process.corruption in ("absorbing", "mixed"):
        assert (process.denoise(logits)[..., process.mask_id] == float("-inf")).all()  # never predicts [MASK]
    assert process.denoise(logits).dtype == torch.float32 and process.denoise(logits).shape == logits.shape


@pytest.mark.parametrize("name", NAMES)
def test_refuses_samplers_it_cannot_serve(name):
    process = make(name)
    own = SimpleNamespace(name="own", corruptions=(process.corruption,), autoregressive=process.autoregressive)
    other_kind = SimpleNamespace(name="other", corruptions=("uniform",) if process.corruption != "uniform"
                                 else ("absorbing",), autoregressive=process.autoregressive)
    other_order = SimpleNamespace(name="ltr", corruptions=(process.corruption,), autoregressive=not process.autoregressive)
    assert process.supports(own)
    for bad in (other_kind, other_order):
        assert not process.supports(bad)
        with pytest.raises(ValueError, match=f"sampler '{bad.name}' cannot sample a '{process.name}' model"):
            process.check_sampler(bad)


@pytest.mark.parametrize("name", NAMES)
def test_is_a_module_whose_state_round_trips_and_is_optimised(name):
    """Buffers and parameters are module state; every parameter is in an optimizer group (trained)."""
    process = make(name)
    assert isinstance(process, torch.nn.Module)
    state = {k: v.clone() for k, v in process.state_dict().items()}
    with torch.no_grad():
        for v in process.state_dict().values():
            v.add_(1.0)
    assert all(not torch.equal(v, process.state_dict()[k]) for k, v in state.items())
    process.load_state_dict(state)
    assert all(torch.equal(v, process.state_dict()[k]) for k, v in state.items())
    grouped = {id(p) for g in process.optimizer_groups() for p in g["params"]}
    assert grouped == {id(p) for p in process.parameters() if p.requires_grad}
    assert (name in LEARNABLE) == bool(list(process.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_it_knows_its_model_and_says_what_its_likelihood_is(name):
    process = make(name)
    assert process.vocab_size == V and process.description.mask_id == MASK and process.description.context == L
    assert process.likelihood in LIKELIHOODS and (process.likelihood == "exact") == process.autoregressive


@pytest.mark.parametrize("name", NAMES)
def test_per_row_values_sum_to_the_totals_and_equal_each_row_alone(name, tiny_network):
    process, net, full = make(name), tiny_network(V), batch(B=3)
    gens = lambda rows: [torch.Generator().manual_seed(100 + r) for r in rows]  # noqa: E731
    together = process.nelbo(net, full, 2, gens(range(3)))
    for out in (together, process.loss(net, full, torch.Generator().manual_seed(1))):
        assert out.nll_per_row.shape == out.tokens_per_row.shape == (3,)
        assert float(out.nll_per_row.sum()) == pytest.approx(float(out.nll_sum), rel=1e-5)
        assert int(out.tokens_per_row.sum()) == int(out.num_tokens) and bool((out.nll_per_row >= 0).all())
    for r in range(3):
        alone = process.nelbo(net, {k: v[r:r + 1] for k, v in full.items()}, 2, gens([r]))
        assert float(together.nll_per_row[r]) == pytest.approx(float(alone.nll_sum), rel=1e-5, abs=1e-6)
        assert int(together.tokens_per_row[r]) == int(alone.num_tokens)


def test_a_learnable_process_is_trained_saved_emad_exported_and_loaded(micro_args, tmp_path):
    """`dlm train process=learned_test`: its parameter gets gradients and AdamW updates, its EMA is kept, and the
    checkpoint and the export carry the parameter and the buffer, loaded back into the process."""
    import dlm
    from dlm.checkpoint import read_checkpoint
    from dlm.cli import main

    out = tmp_path / "learned"
    assert main(["train", *micro_args(out, "process=learned_test", "trainer.max_steps=4", "optim.warmup_steps=0",
                                      "optim.lr=1e-2")]) == 0
    ckpt = read_checkpoint(out / "checkpoints" / "last.ckpt")
    live = float(ckpt["state_dict"]["process.log_scale"])
    ema = float(ckpt["dlm"]["ema_process"]["log_scale"])
    assert live != 0.0 and ema != live  # optimised (it starts at 0), and its EMA lags behind
    exported, from_ckpt = dlm.load(out), dlm.load(out / "checkpoints" / "last.ckpt", use_ema=False)
    assert isinstance(exported.process, LearnedTemperature) and float(exported.process.log_scale.detach()) == pytest.approx(ema)
    assert float(from_ckpt.process.log_scale.detach()) == pytest.approx(live)
    want_bias = torch.linspace(0.0, 0.1, exported.network.cfg.vocab_size)
    assert torch.equal(exported.process.bias, want_bias) and torch.equal(from_ckpt.process.bias, want_bias)


# ------------------------------------------------------------------------------------------ given positions
def given_batch(B=3, seed=0):
    """A batch whose `given` positions (a prompt of 2 to 7 tokens after BOS, per row) lie inside its loss_mask:
    only the process's honouring of `given` keeps them from being noised and scored."""
    b = batch(B, seed)
    given = torch.zeros(B, L, dtype=torch.bool)
    for r in range(B):
        given[r, : 3 + 2 * r] = True
    given[:, 0] = True  # BOS
    b["given"] = given
    assert (b["loss_mask"] & given).any()
    return b


class InputSpy:
    """Records what the network is fed (token ids, or input embeddings) in every forward call, next-token calls
    included (they go through forward)."""

    def __init__(self, net):
        self.ids, self.embeds = [], []
        self.handle = net.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        embeds = args[1] if len(args) > 1 else kwargs.get("inputs_embeds")
        if ids is not None:
            self.ids.append(ids.detach().clone())
        if embeds is not None:
            self.embeds.append(embeds.detach().clone())

    def given_intact(self, net, x, given) -> bool:
        """Whether every recorded input holds the clean token (or its embedding) at every given position. A call
        on T tokens is checked on its first min(T, L) (bd3lm feeds [z_t ; x]: z_t first; ar feeds x[:, :-1]). A call
        on fewer rows than the batch (a process that splits its batch: esolm's diffusion and sequential rows) is
        checked against the contiguous rows of the batch it may have been fed, and must match one of them."""
        with torch.no_grad():
            clean = net.embed_tokens(x)

        def fits(fed, want, close):
            b, n = fed.shape[0], min(fed.shape[1], want.shape[1])
            return any(close(fed[:, :n][given[o:o + b, :n]], want[o:o + b, :n][given[o:o + b, :n]])
                       for o in range(want.shape[0] - b + 1))

        ok = all(fits(ids, x, torch.equal) for ids in self.ids)
        near = lambda a, b: torch.allclose(a.float(), b.float(), atol=1e-6)  # noqa: E731
        return ok and all(fits(e, clean, near) for e in self.embeds)


@pytest.mark.parametrize("name", NAMES)
def test_given_positions_are_never_corrupted(name, tiny_network):
    """Training (loss) and evaluation (nelbo) never change a given position in what the network sees. Without
    `given`, the same positions are noised (so this test can fail): for every process that corrupts at all."""
    process, net, b = make(name), tiny_network(V).train(), given_batch()
    x, given = b["input_ids"], b["given"]
    spy = InputSpy(net)
    for seed in range(4):
        process.loss(net, b, torch.Generator().manual_seed(seed))
        process.nelbo(net, b, 2, torch.Generator().manual_seed(seed))
    assert spy.ids or spy.embeds
    assert spy.given_intact(net, x, given)
    spy.handle.remove()
    if process.corruption != "none":
        without = InputSpy(net)
        plain = {k: v for k, v in b.items() if k != "given"}
        for seed in range(4):
            process.loss(net, plain, torch.Generator().manual_seed(seed))
        assert not without.given_intact(net, x, given)
        without.handle.remove()


@pytest.mark.parametrize("name", NAMES)
def test_given_positions_are_never_scored(name, tiny_network):
    """The loss and the bound with `given` are those of the same batch with the given positions taken out of
    loss_mask: no term at a given position, no given token counted (the network still sees them as context)."""
    process, net, b = make(name), tiny_network(V).train(), given_batch()
    out_of_mask = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                   "loss_mask": b["loss_mask"] & ~b["given"]}
    for run in (lambda bb, s: process.loss(net, bb, torch.Generator().manual_seed(s)),
                lambda bb, s: process.nelbo(net, bb, 2, [torch.Generator().manual_seed(s + r) for r in range(3)])):
        for seed in (0, 1):
            a, want = run(b, seed), run(out_of_mask, seed)
            assert torch.equal(a.num_tokens, want.num_tokens) and int(a.num_tokens) == int(out_of_mask["loss_mask"].sum())
            assert torch.equal(a.tokens_per_row, want.tokens_per_row)
            assert float(a.nll_sum) == pytest.approx(float(want.nll_sum), rel=1e-6)
            assert torch.allclose(a.nll_per_row.double(), want.nll_per_row.double(), rtol=1e-6)
            assert float(a.loss.detach()) == pytest.approx(float(want.loss.detach()), rel=1e-6)


def test_honour_given_leaves_a_batch_without_given_alone():
    from dlm.process.base import corruptible, honour_given

    b = batch()
    assert honour_given(b) is b and torch.equal(corruptible(b), b["loss_mask"])
    g = given_batch()
    h = honour_given(g)
    assert torch.equal(h["loss_mask"], g["loss_mask"] & ~g["given"]) and not torch.equal(h["loss_mask"], g["loss_mask"])
