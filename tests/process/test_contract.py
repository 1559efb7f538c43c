"""The process contract (dlm/process/base.py), checked for every registered process and for soft-masking: a new
process is tested by being registered."""

from types import SimpleNamespace

import pytest
import torch

from dlm.build import build_process
from dlm.config import build_config
from dlm.data.batch import make_batch
from dlm.process import PROCESSES, Process

V, L, MASK = 13, 16, 12
EXTRA = {"bd3lm": ["process.block_size=4"]}  # what a process needs beyond its preset to train at context L


def make(name: str) -> Process:
    """The process `name` as `dlm train process=NAME` builds it ("softmask": MDLM with soft-masking)."""
    overrides = ["softmask.enabled=true", "softmask.omega_s=0.5", "softmask.omega_b=-8.0"] if name == "softmask" else [
        f"process.name={name}", *EXTRA.get(name, [])]
    cfg = build_config([f"model.context={L}", "data.vocab_size=300", *overrides])
    cfg.model.vocab_size = V
    return build_process(cfg, MASK)


NAMES = sorted(PROCESSES) + ["softmask"]


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
def test_is_a_module_whose_learnable_parts_round_trip(name):
    process = make(name)
    assert isinstance(process, torch.nn.Module)
    state = {k: v.clone() for k, v in process.state_dict().items()}
    with torch.no_grad():
        for p in process.parameters():
            p.add_(1.0)
    assert all(not torch.equal(v, process.state_dict()[k]) for k, v in state.items())
    process.load_state_dict(state)
    assert all(torch.equal(v, process.state_dict()[k]) for k, v in state.items())
    assert (name == "softmask") == bool(list(process.parameters()))  # only soft-masking learns anything here
