"""The dream sampler against a reference computation of Dream's rule written here from its published algorithm
(`diffusion_generate` / `_sample` / `sample_tokens` of Dream's generation_utils.py) and of Fast-dLLM's block-wise
Dream variant (Fast-dLLM's dream/model/generation_utils_block.py): tokens and NFE, at steps < length, for every alg,
with and without alg_temp, temperature, top_p and top_k, on a plain and a shifted (Dream-style) network.

The reference calls the network at every step, as Dream does; the sampler skips the calls of steps that commit
nothing (their canvas is the previous one), so its NFE is the number of the reference's steps that committed a
token. Random numbers: one generator per row, drawn in the order the sampler documents (origin's coins (float32, one
per position) before a call, then one float64 uniform per position for the draw of the predictions at temperature >
0, then one per position for alg_temp's Gumbel keys); the draw is the inverse CDF of the cut distribution and
alg_temp's draw without replacement is the top k of score / alg_temp + Gumbel noise, whose law is checked against the
sequential draw's exact probabilities below. Equal scores are taken leftmost first (torch.topk, which Dream calls,
leaves their order unspecified; they are common at Dream's instruct setting, temperature 0.1 and top_p 0.9, where a
one-token nucleus scores an entropy of ~0 at many positions)."""

import itertools
import math

import pytest
import torch

from dlm.process import MaskedDiffusion
from dlm.process.schedules import LogLinearSchedule
from dlm.sampler import Canvas
from dlm.sampler.dream import DreamConfig, gumbel_top_k, transfer_count
from dlm.sampler.registry import make_sampler
from tests.sampler.test_contract import CHECKS, blockwise_of, check_nfe_and_events, check_output
from tests.sampler.test_padding import models, one_thread  # noqa: F401 (fixtures)

V, MASK = 24, 23
PROMPT = [1, 5, 6, 7]


@pytest.fixture
def process():
    return MaskedDiffusion(LogLinearSchedule(1e-3), MASK)


@pytest.fixture(params=["same_position", "shifted"])
def net(tiny_network, request):
    return tiny_network(V, seed=1, std=0.5, prediction=request.param)


# ------------------------------------------------------------------------------------------ the reference
def cut(logits, temperature, top_p, top_k):
    """Dream's sample_tokens before its softmax: temperature, then the nucleus (the sorted cumulative probability
    above top_p is cut, shifted one to the right so that the token crossing it stays), then top-k."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        ranked, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(ranked, -1).cumsum(-1)
        drop = cumulative > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -math.inf)
    if top_k is not None:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k)[0][..., -1:], -math.inf)
    return logits


def draw(probs, u):
    """The first token whose cumulative probability reaches u times the total (inverse CDF)."""
    cdf = probs.cumsum(-1)
    return (cdf < u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=probs.shape[-1] - 1)


def scored(logits, u, alg, temperature, top_p, top_k):
    """(x0, confidence) of Dream's sample_tokens on logits (n, V) float64."""
    probs = torch.softmax(cut(logits, temperature, top_p, top_k), -1)
    x0 = draw(probs, u) if temperature > 0 else probs.argmax(-1)
    if alg == "topk_margin":
        top = probs.sort(-1, descending=True).values
        return x0, top[:, 0] - top[:, 1]
    if alg == "entropy":
        return x0, (probs * torch.log(probs + 1e-10)).sum(-1)
    return x0, probs.gather(-1, x0[:, None])[:, 0]


def logits_of(net, process, x, span=None):
    """x_theta logits (n, V) float64 of one call on the canvas x (1, T), at the positions `span` (a slice)."""
    T = x.shape[1]
    raw = process.forward_logits(net, x, None, positions=torch.arange(T)[None], logits_at=span)
    return process.denoise(raw)[0].double()


def commit_scored(x, where, x0, conf, k, alg_temp, g):
    """Commit k of the candidates `where` (n,) canvas indices by their confidences conf (n,): the k best, or with
    alg_temp the draw without replacement of weights softmax(conf / alg_temp) (Gumbel keys from uniforms of g)."""
    keys = conf
    if alg_temp:
        u = torch.rand(x.shape[1], generator=g, dtype=torch.float64)[where]  # one uniform per canvas position
        keys = conf / alg_temp - torch.log(-torch.log(u))
    pick = torch.argsort(keys, descending=True, stable=True)[:k]  # ties (e.g. one-token nuclei: entropy ~0) leftmost
    x[0, where[pick]] = x0[pick]


def dream_reference(net, process, canvas, steps, alg="origin", alg_temp=None, temperature=0.0, top_p=None,
                    top_k=None, eps=1e-3, seed=0):
    """Dream's `_sample` on one row (1, T), every masked position generated: (tokens, calls that committed)."""
    g = torch.Generator().manual_seed(seed)
    x = canvas.clone()
    T = x.shape[1]
    times = torch.linspace(1, eps, steps + 1)  # float32
    calls = 0
    for i in range(steps):
        masked = x[0] == MASK
        n = int(masked.sum())
        if n == 0:
            break
        t, s = times[i], times[i + 1]
        last = i == steps - 1
        if alg == "origin":
            p = 1.0 if last else 1 - s / t
            transfer = masked & (torch.rand(T, generator=g) < p)
            if not transfer.any():
                continue  # the canvas stays: Dream's next call sees the same one
        else:
            k = n if last else int(torch.tensor(float(n)) * (1 - s / t))
            if k == 0:
                continue
        logits = logits_of(net, process, x)
        calls += 1
        u = torch.rand(T, generator=g, dtype=torch.float64) if temperature > 0 else None
        where = masked.nonzero()[:, 0]
        x0, conf = scored(logits[where], None if u is None else u[where], alg, temperature, top_p, top_k)
        if alg == "origin":
            full = torch.zeros(T, dtype=torch.long)
            full[where] = x0
            x[0, transfer] = full[transfer]
        else:
            commit_scored(x, where, x0, conf, k, alg_temp, g)
    return x[0], calls


def fast_dllm_reference(net, process, canvas, prompt_length, block_length, steps, alg="entropy", alg_temp=None,
                        temperature=0.0, top_p=None, top_k=None, eps=1e-3, threshold=0.9, seed=0):
    """Fast-dLLM's Dream block loop on one row, every call a full forward (no cache): (tokens, calls)."""
    g = torch.Generator().manual_seed(seed)
    x = canvas.clone()
    b = block_length
    blocks = (x.shape[1] - prompt_length) // b
    K = steps // blocks
    times = torch.linspace(1, eps, K + 1)
    calls = 0
    for block in range(blocks):
        s0 = prompt_length + block * b
        span = slice(s0, s0 + b)
        logits = logits_of(net, process, x, span)  # the refresh: the block's first position is committed
        calls += 1
        u = torch.rand(b, generator=g, dtype=torch.float64) if temperature > 0 else None
        x0, _ = scored(logits, u, "maskgit_plus", temperature, top_p, top_k)
        x[0, s0] = x0[0]
        i = 1
        while bool((x[0, span] == MASK).any()):
            masked = x[0, span] == MASK
            n = int(masked.sum())
            if alg == "confidence_threshold":
                logits = logits_of(net, process, x, span)
                calls += 1
                u = torch.rand(b, generator=g, dtype=torch.float64) if temperature > 0 else None
                where = masked.nonzero()[:, 0]
                x0, conf = scored(logits[where], None if u is None else u[where], "maskgit_plus", temperature,
                                  top_p, top_k)
                keep = conf >= threshold
                keep[conf.argmax()] = True  # the most confident one always
                x[0, s0 + where[keep]] = x0[keep]
                continue
            t, s = times[i], times[i + 1]
            last = i == K - 1
            if alg == "origin":
                transfer = masked & (torch.rand(b, generator=g) < (1.0 if last else 1 - s / t))
                if not transfer.any():
                    i += 1
                    continue
            else:
                k = n if last else int(torch.tensor(float(n)) * (1 - s / t))
                if k == 0:
                    i += 1
                    continue
            logits = logits_of(net, process, x, span)
            calls += 1
            u = torch.rand(b, generator=g, dtype=torch.float64) if temperature > 0 else None
            where = masked.nonzero()[:, 0]
            x0, conf = scored(logits[where], None if u is None else u[where], alg, temperature, top_p, top_k)
            if alg == "origin":
                full = torch.zeros(b, dtype=torch.long)
                full[where] = x0
                x[0, s0:s0 + b][transfer] = full[transfer]
            else:
                view = x[:, s0:s0 + b]
                commit_scored(view, where, x0, conf, k, alg_temp, g)
            i += 1
    return x[0], calls


def prompt_canvas(gen_length):
    return torch.tensor([PROMPT + [MASK] * gen_length])


def run(sampler, net, process, canvas, seed=0):
    out = sampler.sample(net, process, Canvas.from_fixed(canvas, canvas != MASK), [torch.Generator().manual_seed(seed)])
    return out.tokens[0], out.nfe


# ------------------------------------------------------------------------------------------ Dream's rule
ALG_CASES = [dict(alg="origin"), dict(alg="origin", temperature=0.7), dict(alg="maskgit_plus"),
             dict(alg="maskgit_plus", temperature=0.9, top_p=0.9), dict(alg="maskgit_plus", alg_temp=0.5),
             dict(alg="topk_margin"), dict(alg="topk_margin", temperature=0.5, top_k=5),
             dict(alg="topk_margin", alg_temp=0.2, temperature=1.0),
             dict(alg="entropy"), dict(alg="entropy", temperature=0.1, top_p=0.9),  # Dream's instruct evaluation
             dict(alg="entropy", alg_temp=0.3, temperature=0.8, top_p=0.95, top_k=8)]


@pytest.mark.parametrize("case", ALG_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("steps", [5, 11])
def test_dream_rule_gives_the_reference_tokens_and_nfe(net, process, case, steps):
    canvas = prompt_canvas(16)  # 16 positions, fewer steps
    for seed in (0, 1):
        want, calls = dream_reference(net, process, canvas, steps, seed=seed, **case)
        got, nfe = run(make_sampler("dream", steps=steps, **case), net, process, canvas, seed)
        assert torch.equal(got, want), (case, seed)
        assert nfe == calls <= steps


def test_steps_that_commit_nothing_make_no_call(net, process):
    """At steps = length Dream's first step commits int(16 (1 - s/t)) = 0 tokens: its call is skipped; an infill
    canvas (masks on both sides of given tokens) is generated too."""
    canvas = torch.tensor([[1, 5, MASK, MASK, 6, MASK, MASK, MASK, 7, MASK, MASK, MASK, MASK, MASK, MASK, MASK]])
    n = int((canvas == MASK).sum())
    assert transfer_count(torch.tensor([n]), torch.tensor([0]), torch.tensor([n]), 1e-3).item() == 0
    for alg in ("entropy", "origin"):
        want, calls = dream_reference(net, process, canvas, n, alg=alg, temperature=0.5, seed=3)
        got, nfe = run(make_sampler("dream", steps=n, alg=alg, temperature=0.5), net, process, canvas, 3)
        assert torch.equal(got, want) and nfe == calls < n
    many, nfe = run(make_sampler("dream", steps=200, alg="maskgit_plus"), net, process, canvas)
    assert nfe <= n and not bool((many == MASK).any())  # a budget above the masks: at most one call per position


def test_counts_are_per_row_and_rows_are_batch_invariant(net, process):
    """Dream divides the batch's masks by its rows; here each row counts its own: two rows with 16 and 8 masks get
    the tokens of their reference alone, which the batch mean (12 each) would not give."""
    long_row = prompt_canvas(16)[0]
    short_row = torch.tensor(PROMPT + [5, 6, 7, 8, 9, 10, 11, 12] + [MASK] * 8)
    canvas = torch.stack((long_row, short_row))
    sampler = make_sampler("dream", steps=6, alg="entropy", temperature=0.6)
    gens = [torch.Generator().manual_seed(4), torch.Generator().manual_seed(5)]
    out = sampler.sample(net, process, Canvas.from_fixed(canvas, canvas != MASK), gens)
    for row, seed in ((0, 4), (1, 5)):
        want, calls = dream_reference(net, process, canvas[row:row + 1], 6, alg="entropy", temperature=0.6, seed=seed)
        assert torch.equal(out.tokens[row], want) and int(out.nfe_per_row[row]) == calls
    counts = transfer_count(torch.tensor([16, 8]), torch.tensor([1, 1]), torch.tensor([6, 6]), 1e-3)
    mean = transfer_count(torch.tensor([12, 12]), torch.tensor([1, 1]), torch.tensor([6, 6]), 1e-3)
    assert counts.tolist() != mean.tolist()  # Dream's batch mean would have given both rows the same count


def test_gumbel_top_k_is_a_draw_without_replacement():
    """alg_temp's draw: P(set {a, b}) of two draws without replacement with weights w is
    w_a w_b / W (1 / (W - w_a) + 1 / (W - w_b)); the Gumbel-top-2 frequencies match it (6-sigma bounds)."""
    scores = torch.tensor([[0.3, -0.2, 0.9, 0.1, float("-inf")]], dtype=torch.float64)
    alg_temp, n = 0.5, 40000
    w = torch.softmax(scores[0] / alg_temp, -1)
    W = float(w.sum())
    g = torch.Generator().manual_seed(0)
    u = torch.rand(n, 5, generator=g, dtype=torch.float64)
    picks = gumbel_top_k(scores.expand(n, 5), torch.full((n,), 2), alg_temp, u)
    assert not bool(picks[:, 4].any()) and bool((picks.sum(1) == 2).all())
    for a, b in itertools.combinations(range(4), 2):
        p = float(w[a] * w[b] / W * (1 / (W - w[a]) + 1 / (W - w[b])))
        freq = float((picks[:, a] & picks[:, b]).double().mean())
        assert abs(freq - p) < 6 * math.sqrt(p * (1 - p) / n), (a, b, freq, p)


# ------------------------------------------------------------------------------------------ Fast-dLLM's variant
BLOCK_CASES = [dict(alg="entropy"), dict(alg="entropy", temperature=0.5, top_p=0.9), dict(alg="maskgit_plus"),
               dict(alg="topk_margin", alg_temp=0.4, temperature=0.3), dict(alg="origin", temperature=0.8),
               dict(alg="confidence_threshold"), dict(alg="confidence_threshold", threshold=0.3, temperature=0.4)]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("steps", [6, 12])
def test_fast_dllm_dream_variant_gives_the_reference_tokens_and_nfe(net, process, case, steps):
    canvas = prompt_canvas(12)  # 3 blocks of 4: 2 or 4 steps per block
    for seed in (0, 2):
        want, calls = fast_dllm_reference(net, process, canvas, len(PROMPT), 4, steps, seed=seed, **case)
        sampler = make_sampler("dream", steps=steps, block_length=4, **case)
        out = sampler.sample(net, process, Canvas.left_padded([PROMPT], 12, process),
                             [torch.Generator().manual_seed(seed)])
        assert torch.equal(out.tokens[0], want), (case, seed)
        assert out.nfe == calls


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("alg", ["entropy", "confidence_threshold"])
def test_fast_dllm_dream_caches_are_exact_where_fast_dllm_is(tiny_network, process, cache, alg):
    """Under block-causal attention (a block never sees later ones) and a network without time conditioning the
    prefix and dual caches are exact, so the cached variant gives the uncached tokens and calls (shifted network:
    the block's first position reads the prefix's cached final hidden state)."""
    net = tiny_network(V, seed=2, std=0.5, prediction="shifted")
    canvas = Canvas.left_padded([PROMPT, [1, 9], [1, 3, 4, 5, 6, 7, 8]], 12, process, pad_id=0)
    outs = {}
    for mode in ("none", cache):
        sampler = make_sampler("dream", steps=9, block_length=4, alg=alg, threshold=0.3, temperature=0.5, cache=mode)
        sampler.block_causal = True
        outs[mode] = sampler.sample(net, process, canvas, [torch.Generator().manual_seed(i) for i in range(3)])
    assert torch.equal(outs[cache].tokens, outs["none"].tokens) and outs[cache].nfe == outs["none"].nfe


@pytest.mark.parametrize("make", [lambda: make_sampler("dream", steps=8, alg="entropy", alg_temp=0.5, temperature=0.9),
                                  lambda: make_sampler("dream", steps=8, alg="maskgit_plus", top_k=3, temperature=1.0)],
                         ids=["entropy-alg_temp", "maskgit_plus-top_k"])
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_every_alg_passes_the_sampler_contract(tiny_network, make, check):
    from tests.sampler.test_contract import setup

    check(*setup("dream", tiny_network, make))


@pytest.mark.parametrize("check", [check_output, check_nfe_and_events], ids=lambda c: c.__name__)
def test_the_block_variant_passes_the_contract_on_prompts(tiny_network, check):
    from tests.sampler.test_contract import setup

    sampler, net, process, _ = setup("dream", tiny_network, lambda: make_sampler(
        "dream", steps=8, block_length=4, alg="entropy", temperature=0.9, cache="dual"))
    check(sampler, net, process, Canvas.left_padded([[0, 5, 6, 7], [0, 4], [0, 3, 9]], 8, process, pad_id=2))
    assert blockwise_of("dream").inner.block_length is None  # inside the blockwise wrapper: Dream's rule per block


def test_bad_options_are_refused_naming_the_fix():
    for bad, match in [(dict(alg="low_confidence"), "alg='low_confidence' is unknown; valid: origin"),
                       (dict(alg="origin", alg_temp=0.5), "no effect with alg='origin'"),
                       (dict(top_p=0.0), "top_p"), (dict(top_k=0), "top_k"), (dict(eps=0.0), "eps"),
                       (dict(cache="dual"), "give block_length too"),
                       (dict(alg="confidence_threshold"), "give block_length too"),
                       (dict(threshold=1.5, block_length=4), "threshold")]:
        with pytest.raises(ValueError, match=match):
            make_sampler("dream", **bad)
    assert DreamConfig().steps == 512 and DreamConfig().alg == "origin"  # Dream's defaults


def test_one_step_per_block_is_refused(tiny_network, process):
    sampler = make_sampler("dream", steps=3, block_length=4, alg="entropy")
    with pytest.raises(ValueError, match="needs at least one more; use steps >= 6"):
        sampler.sample(tiny_network(V), process, Canvas.left_padded([PROMPT], 12, process))


DREAM_JOINS = [dict(), dict(alg="entropy", alg_temp=0.5), dict(block_length=8, alg="entropy"),
               dict(block_length=8, alg="origin", cache="prefix"),
               dict(block_length=8, alg="topk_margin", cache="dual"),
               dict(block_length=8, alg="confidence_threshold", threshold=0.3, cache="dual")]


@pytest.mark.parametrize("variant", DREAM_JOINS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) or "origin")
def test_rows_joining_and_leaving_get_their_tokens_alone(models, variant):
    """Step by step, requests join a running batch (a longer prompt left-pads the others, and with blocks joins in
    another block) and leave when done, each with the tokens and calls it gets alone."""
    from tests.sampler.test_step_api import PROMPTS, run_joining_and_leaving
    from tests.sampler.test_padding import GEN

    model = models["mdlm"]
    sampler = make_sampler("dream", steps=8, temperature=0.8, **variant)
    net, process = model.network, model.process
    prompts = [[model.tokenizer.bos_token_id] + model.encode(p) for p in PROMPTS]

    def canvas(i):
        return Canvas.left_padded([prompts[i]], GEN, process)

    def gen(i):
        return [torch.Generator().manual_seed(400 + i)]

    with torch.no_grad():
        alone = {i: sampler.sample(net, process, canvas(i), gen(i)) for i in range(4)}
        for first, joins in (((0, 1), {2: 2, 4: 3}), ((2, 3), {1: 0, 3: 1})):
            got = run_joining_and_leaving(sampler, net, process, canvas, gen, first, joins, GEN)
            for i in range(4):
                assert torch.equal(got[i], alone[i].tokens[0, -GEN:]), (variant, first, i)
