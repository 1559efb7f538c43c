"""The Eso-LM sampler (dlm/sampler/esolm.py): its schedules of position sets (a partition of the positions to
generate; the binomial sizes of first principles), the KV-cached calls equal to recomputing the sorted sequence
(tokens for a seed, and the logits of every step against a brute-force pass of the whole sorted sequence under the
process's attention rule), prompts, infill and left padding, rows joining and leaving a running batch, NFE."""

import math

import pytest
import torch

from dlm.process.esolm import EsoLM
from dlm.process.esolm_mask import diffusion_mask
from dlm.sampler import Canvas
from dlm.sampler.esolm import SCHEDULES, attention_rule, position_schedule
from dlm.sampler.registry import make_sampler
from dlm.sampler.state import SamplerState
from tests.sampler.test_step_api import run_joining_and_leaving
from tests.toy_canvas import MASK, V, canvas_and_fixed, process as mdlm


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def esolm(attention="causal", alpha0=0.5, alpha0_eval=None):
    return EsoLM(MASK, alpha0=alpha0, alpha0_eval=alpha0_eval, attention=attention)


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


# ------------------------------------------------------------------------------------------ the schedule
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("alpha0", [1.0, 0.5, 0.0])
def test_the_sets_partition_the_positions_to_generate(schedule, alpha0):
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        L = 40
        open_ = torch.rand(L, generator=g) < 0.7
        u = torch.rand(L, generator=g, dtype=torch.float64)
        when, frac, t_at = position_schedule(u, open_, alpha0, schedule, steps=7, parallelism=3)
        assert torch.equal(when > 0, open_)  # every position to generate in exactly one set, nothing else
        K = int(when.max())
        sizes = torch.bincount(when, minlength=K + 1)[1:]
        assert bool((sizes > 0).all())  # no empty step
        diffusion = open_ & (u < alpha0)
        n_sets = int(when[diffusion].max()) if bool(diffusion.any()) else 0
        assert bool((when[diffusion] <= n_sets).all()) and bool((when[open_ & ~diffusion] > n_sets).all())
        seq = (open_ & ~diffusion).nonzero().squeeze(1)  # then one per step, left to right
        assert when[seq].tolist() == list(range(n_sets + 1, n_sets + 1 + seq.numel()))
        d = diffusion.nonzero().squeeze(1)
        if schedule == "first_hitting":
            assert sizes[:n_sets].eq(1).all() and torch.equal(when[d].argsort(), u[d].argsort())
        if schedule == "fixed" and n_sets:
            assert sizes[:n_sets - 1].eq(3).all() and 1 <= int(sizes[n_sets - 1]) <= 3
        if schedule == "subcontext" and n_sets:  # each set: every m-th diffusion position, m = number of sets
            m = n_sets
            assert m == math.ceil(d.numel() / 3)
            for s in range(1, m + 1):
                ranks = (when[d] == s).nonzero().squeeze(1)
                assert bool((ranks.diff() == m).all()) and int(ranks[0]) < m
        if schedule in ("fixed", "first_hitting") and n_sets:  # sets in the order of the unmasking times
            first = [float(u[when == s].min()) for s in range(1, n_sets + 1)]
            assert first == sorted(first)
        assert bool((t_at[open_ & ~diffusion] == 0).all()) and bool(((t_at >= 0) & (t_at <= 1)).all())


def test_binomial_set_sizes_follow_the_reverse_process():
    """n_i ~ Binomial(remaining, (alpha_s - alpha_t) / (1 - alpha_t)) on t_i = 1 - i/T, alpha_t = alpha0 (1 - t):
    the first set's mean and variance, the second's conditional mean given the first, and the diffusion total
    ~ Binomial(N, alpha0)."""
    N, T, alpha0, draws = 60, 5, 0.6, 3000
    g = torch.Generator().manual_seed(0)
    open_ = torch.ones(N, dtype=torch.bool)
    alpha = lambda t: alpha0 * (1 - t)  # noqa: E731
    n0, n1, total = [], [], []
    for _ in range(draws):
        when, _, t_at = position_schedule(torch.rand(N, generator=g, dtype=torch.float64), open_, alpha0, "binomial", T)
        grid = torch.round((1 - t_at[t_at > 0]) * T).long()  # the grid interval of each diffusion position
        counts = torch.bincount(grid, minlength=T).double()
        n0.append(counts[0])
        n1.append(counts[1])
        total.append(counts.sum())
    n0, n1, total = torch.stack(n0), torch.stack(n1), torch.stack(total)
    p0 = (alpha(1 - 1 / T) - alpha(1.0)) / (1 - alpha(1.0))
    p1 = (alpha(1 - 2 / T) - alpha(1 - 1 / T)) / (1 - alpha(1 - 1 / T))
    se = math.sqrt(N * p0 * (1 - p0) / draws)
    assert abs(float(n0.mean()) - N * p0) < 4 * se
    assert float(n0.var()) == pytest.approx(N * p0 * (1 - p0), rel=0.1)
    residual = n1 - (N - n0) * p1  # E[n_1 | n_0] = (N - n_0) p1
    assert abs(float(residual.mean())) < 4 * math.sqrt(N * p1 * (1 - p1) / draws)
    assert abs(float(total.mean()) - N * alpha0) < 4 * math.sqrt(N * alpha0 * (1 - alpha0) / draws)


def test_the_attention_rule_and_alpha0_come_from_the_process():
    assert attention_rule(esolm("causal")) == "causal"
    assert attention_rule(esolm("clean_bidirectional")) == "clean_bidirectional"
    assert attention_rule(mdlm()) == "bidirectional"
    sampler = make_sampler("esolm", schedule="first_hitting")
    net = tiny(seed=0)
    canvas = Canvas.from_fixed(*canvas_and_fixed(1))
    for alpha0_eval, expected in ((0.0, 10), (1.0, None)):  # alpha0 = 0: one position per call, left to right
        events = []
        sampler.sample(net, esolm(alpha0=0.5, alpha0_eval=alpha0_eval), canvas, gens(1),
                       lambda e: events.append(e.committed[0].nonzero().flatten().tolist()) and None)
        if expected:
            assert len(events) == expected and [p for e in events for p in e] == sorted(p for e in events for p in e)
    with pytest.raises(ValueError, match="schedule"):
        make_sampler("esolm", schedule="nope")
    with pytest.raises(ValueError, match="alpha0"):
        make_sampler("esolm", alpha0=1.5)


# ------------------------------------------------------------------------------------------ cached == uncached
def tiny(seed=3, time_conditioning=False):
    from dlm.network import Transformer
    from dlm.network.config import ModelConfig

    torch.manual_seed(seed)
    net = Transformer(ModelConfig(n_layer=2, n_head=2, d_model=32, context=64, cond_dim=16, vocab_size=V,
                                  time_conditioning=time_conditioning))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2 and "adaln" not in name:
                p.normal_(0.0, 0.3)
    return net.eval()


def canvases():
    """No context, a prompt, infill (given tokens in the middle) and left-padded prompts of other lengths."""
    plain = Canvas(torch.full((2, 12), MASK), torch.ones(2, 12, dtype=torch.bool))
    prompt, fixed = canvas_and_fixed(3)
    fixed[:, 12:] = False
    infill = Canvas.from_fixed(*canvas_and_fixed(3))
    padded = Canvas.left_padded([[0, 5, 6, 7, 8], [0, 4], [0, 3, 9]], 10, mdlm(), pad_id=2)
    return {"none": plain, "prompt": Canvas.from_fixed(torch.where(fixed, prompt, MASK), fixed),
            "infill": infill, "padded": padded}


@pytest.mark.parametrize("which", ["none", "prompt", "infill", "padded"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cached_and_uncached_sampling_give_the_same_tokens(which, schedule):
    net, process, canvas = tiny(), esolm("causal", alpha0=0.5), canvases()[which]
    B = canvas.shape[0]
    valid = canvas.key_valid if canvas.key_valid is not None else torch.ones_like(canvas.to_generate)
    for seed in range(3):
        samplers = [make_sampler("esolm", steps=5, schedule=schedule, parallelism=2, kv_cache=c) for c in (True, False)]
        outs = [s.sample(net, process, canvas, gens(B, 10 * seed)) for s in samplers]
        assert torch.equal(outs[0].tokens, outs[1].tokens), (which, schedule, seed)
        assert not bool(process.is_noise(outs[0].tokens)[canvas.to_generate].any())
        assert torch.equal(outs[0].nfe_per_row, outs[1].nfe_per_row)
        # cached: the context once, then every token twice (as a mask, then clean) but the last set's
        when = samplers[0].start(net, process, canvas, gens(B, 10 * seed)).extras["when"]
        last = (when == when.max(1, keepdim=True).values).sum(1)
        context = (valid & ~canvas.to_generate).sum(1)
        assert outs[0].tokens_computed.tolist() == (context + 2 * canvas.to_generate.sum(1) - last).tolist()
        assert outs[0].nfe == int(when.max())


class Recording(EsoLM):
    """EsoLM whose `denoise` keeps every step's logits (the rows' current masks in the sampler's order)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = []

    def denoise(self, logits):
        self.seen.append(logits.detach().clone())
        return super().denoise(logits)


@pytest.mark.parametrize("attention,kv_cache", [("causal", True), ("causal", False), ("clean_bidirectional", True)])
@pytest.mark.parametrize("which", ["infill", "padded"])
def test_every_step_equals_a_pass_over_the_whole_sorted_sequence(attention, kv_cache, which):
    """Brute force: at step k, the sorted sequence [context (natural order) ; sets 1..k (their order) ; set k+1 as
    masks] run whole under the process's rule (dlm.process.esolm_mask), each token at its own rotary position."""
    net, canvas = tiny(), canvases()[which]
    process = Recording(MASK, alpha0=0.6, attention=attention)
    sampler = make_sampler("esolm", steps=4, kv_cache=kv_cache)
    B, L = canvas.shape
    schedule = sampler.start(net, process, canvas, gens(B, 5)).extras
    out = sampler.sample(net, process, canvas, gens(B, 5))
    when, frac = schedule["when"], schedule["frac"]
    valid = canvas.key_valid if canvas.key_valid is not None else torch.ones(B, L, dtype=torch.bool)
    positions = canvas.positions if canvas.positions is not None else torch.arange(L).expand(B, L)
    steps = int(when.max())
    assert out.nfe == steps == len(process.seen)
    for k in range(steps):
        expected = []
        for b in range(B):
            if k >= int(when[b].max()):
                continue
            seen = (when[b] <= k + 1) & valid[b]
            cols = sorted(seen.nonzero().flatten().tolist(), key=lambda c: (int(when[b, c]), float(frac[b, c])))
            cur = [c for c in cols if int(when[b, c]) == k + 1]
            ids = out.tokens[b, cols].clone()
            ids[len(cols) - len(cur):] = MASK
            mask = diffusion_mask(torch.tensor([len(cols) - len(cur)]), len(cols), attention)
            logits = net(ids[None], attn_mask=mask, positions=positions[b, cols][None])[0]
            expected.append(logits[len(cols) - len(cur):])
        torch.testing.assert_close(process.seen[k], torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_a_time_conditioned_network_is_recomputed_and_plain_masked_diffusion_sees_the_canvas():
    net, canvas = tiny(time_conditioning=True), canvases()["infill"]
    process = EsoLM(MASK, alpha0=0.5, time_conditioning=True)  # its keys depend on t: never cached
    outs = [make_sampler("esolm", steps=4, kv_cache=c).sample(net, process, canvas, gens(3)) for c in (True, False)]
    assert torch.equal(outs[0].tokens, outs[1].tokens) and torch.equal(outs[0].tokens_computed, outs[1].tokens_computed)
    out = make_sampler("esolm", steps=4).sample(tiny(), mdlm(), canvas, gens(3))  # MDLM: whole canvas per call
    assert torch.equal(out.tokens_computed, out.nfe_per_row * canvas.shape[1])


def test_feedback_is_refused_for_the_sorted_rules():
    sampler = make_sampler("esolm", feedback=lambda *args: None)
    with pytest.raises(ValueError, match="attention rule is 'causal'.*without feedback"):
        sampler.start(tiny(), esolm("causal"), canvases()["infill"], gens(3))


@pytest.mark.parametrize("attention,kv_cache", [("causal", True), ("causal", False), ("clean_bidirectional", False)])
@pytest.mark.parametrize("first,joins", [((0, 1), {2: 2, 4: 3}), ((2, 3), {1: 0, 3: 1})],
                         ids=["shorter-join", "longer-join"])
def test_rows_joining_and_leaving_get_their_tokens_alone(attention, kv_cache, first, joins):
    net, process = tiny(), esolm(attention, alpha0=0.5)
    prompts = [[0, 5, 6, 7], [0, 4], [0, 3, 9, 9, 9, 2], [0]]
    sampler = make_sampler("esolm", steps=4, kv_cache=kv_cache, schedule="fixed", parallelism=2)
    gen = 10

    def canvas(i):
        return Canvas.left_padded([prompts[i]], gen, process, pad_id=2)

    def generator(i):
        return [torch.Generator().manual_seed(400 + i)]

    with torch.no_grad():
        alone = [sampler.sample(net, process, canvas(i), generator(i)).tokens[0, -gen:] for i in range(4)]
        got = run_joining_and_leaving(sampler, net, process, canvas, generator, first, joins, gen)
    for i in range(4):
        assert torch.equal(got[i], alone[i]), (attention, i)


def test_cache_rows_follow_select_and_cat():
    net, process = tiny(), esolm("causal")
    sampler = make_sampler("esolm", steps=4)
    a = sampler.start(net, process, Canvas.left_padded([[0, 5, 6]], 6, process), gens(1))
    a, _ = sampler.step(a)
    b = sampler.start(net, process, Canvas.left_padded([[0, 4, 4, 4, 4]], 6, process), gens(1, 7))  # cache empty
    both = SamplerState.cat([a, b])
    cache = both.extras["cache"]
    assert cache.cache.batch == 2 and cache.cache.length == a.extras["cache"].cache.length
    assert not bool(cache.cache.key_valid[1].any())  # the joining row sees none of the running row's keys
    back = both.select(torch.tensor([0]))
    assert torch.equal(back.extras["cache"].cache.layers[0][0], a.extras["cache"].cache.layers[0][0])


def test_generate_with_an_esolm_model_batched_prompts_and_a_template():
    """Through the generation door (`DiffusionLM.generate`): an Eso-LM model's prompts of other lengths give each
    request its tokens alone (batch invariance: per-row generators and the cache's per-row rows), cached and
    uncached alike, and a template's given tokens stay."""
    from dlm.build import build_process
    from dlm.config import build_config
    from dlm.pipeline import DiffusionLM
    from tests.golden import cases as G

    tok = G.tokenizer()
    cfg = build_config(["model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.context=32",
                        "data.vocab_size=300", "process=esolm", "process.alpha0=0.5"])
    cfg.model.vocab_size = len(tok)
    model = DiffusionLM(G.network(len(tok), 0), build_process(cfg, tok.mask_token_id), tok, cfg)
    prompts, seeds = ["And God said", "To be, or not", "And"], [7, 8, 9]

    def gen(ps, ss, **kw):
        return model.generate(ps, gen_length=12, sampler="esolm", seed=ss, precision="32", steps=4, temperature=1.0,
                              **kw).tokens[:, -12:]

    alone = [gen([p], s)[0] for p, s in zip(prompts, seeds)]
    for kv_cache in (True, False):
        batch = gen(prompts, seeds, kv_cache=kv_cache)
        for row in range(3):
            assert torch.equal(batch[row], alone[row]), (kv_cache, row)
    out = model.generate(template="In the [MASK*4] God [MASK*3] the earth.", sampler="esolm", seed=0, steps=3,
                         schedule="subcontext", parallelism=2, precision="32")
    text = out.texts[0]
    assert "God" in text and "earth" in text and model.tokenizer.mask_token not in text
