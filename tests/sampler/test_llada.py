"""The LLaDA-style block sampler: determinism, invariants of the canvas, padding invariance, guidance,
scores, argument checks, and the registry / pipeline / CLI entry points."""

import math

import pytest
import torch

from dlm.process import MaskedDiffusion, make_schedule
from dlm.process.mdlm import subs_logits
from dlm.sampler import Canvas
from dlm.sampler.llada import LLaDASampler, generate_llada
from dlm.sampler.policies import ConfidenceThreshold, CountSchedule, FactorRule
from dlm.sampler.registry import make_sampler
from tests.toy_canvas import llada_with_trajectory

V = 24
MASK = V - 1
PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 3, 4, 5, 6, 7, 8], [2, 2, 3]]


@pytest.fixture
def net(tiny_network):
    return tiny_network(V, seed=1, std=0.5)


@pytest.fixture
def process():
    return MaskedDiffusion(make_schedule("loglinear", 1e-3), mask_id=MASK)


POLICIES = [CountSchedule(), ConfidenceThreshold(0.5), FactorRule(1.0)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_greedy_is_deterministic(net, process, policy):
    a = generate_llada(net, process, PROMPTS, 16, 4, 16, policy=policy, generator=torch.Generator().manual_seed(0))
    b = generate_llada(net, process, PROMPTS, 16, 4, 16, policy=policy, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.tokens, b.tokens) and a.nfe == b.nfe
    assert (a.tokens != MASK).all()


def test_sampling_follows_the_seed(net, process):
    run = lambda seed: generate_llada(net, process, PROMPTS, 16, 4, 16, temperature=1.0,
                                      generator=torch.Generator().manual_seed(seed)).tokens
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_canvas_invariants(net, process, cache, policy):
    """Prompt and committed tokens never change; a block starts only when the one before it is full;
    the count schedule commits LLaDA's even split per step."""
    gen, block, steps = 16, 4, 12
    out = llada_with_trajectory(net, process, PROMPTS, gen, block, steps, policy=policy, cache=cache, temperature=0.7,
                         generator=torch.Generator().manual_seed(0))
    P = max(len(p) for p in PROMPTS)
    traj = out.trajectory
    assert len(traj) == out.nfe
    prev = torch.cat((traj[0][:, :P], torch.full((len(PROMPTS), gen), MASK)), 1)
    per_step = []
    for canvas in traj:
        assert torch.equal(canvas[:, :P], prev[:, :P])  # the (padded) prompt
        was_set = prev != MASK
        assert torch.equal(canvas[was_set], prev[was_set])  # committed tokens stay
        filled = (canvas[:, P:] != MASK).view(len(PROMPTS), gen // block, block)
        started = filled.any(2)  # (B, blocks)
        complete = filled.all(2)
        assert not (started[:, 1:] & ~complete[:, :-1]).any(), "a later block was committed before the current one"
        per_step.append((canvas != prev).sum(1))
        prev = canvas
    assert (prev[:, P:] != MASK).all()
    assert out.sequences == [p + t for p, t in zip(PROMPTS, out.tokens.tolist())]
    if isinstance(policy, CountSchedule):
        assert out.nfe == steps
        per_block = steps // (gen // block)
        q, r = divmod(block, per_block)
        expected = ([q + 1] * r + [q] * (per_block - r)) * (gen // block)
        assert torch.stack(per_step, 1).tolist() == [expected] * len(PROMPTS)
    else:  # adaptive: at least one token per step, so at most block_length steps per block
        assert out.nfe <= gen


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("policy", [CountSchedule(), ConfidenceThreshold(0.5)], ids=lambda p: p.name)
def test_padding_invariance(net, process, cache, policy):
    """A prompt's tokens do not depend on its left padding or on the other prompts of its batch."""
    kw = dict(gen_length=16, block_length=8, steps=8, policy=policy, cache=cache)
    batch = generate_llada(net, process, PROMPTS, **kw).tokens
    other = generate_llada(net, process, [PROMPTS[2], [4, 4, 4, 4, 4, 4, 4, 4, 4, 4], PROMPTS[1]], **kw).tokens
    for i, prompt in enumerate(PROMPTS):
        alone = generate_llada(net, process, [prompt], **kw).tokens[0]
        assert torch.equal(batch[i], alone), f"prompt {i} changed with padding"
    assert torch.equal(other[0], batch[2]) and torch.equal(other[2], batch[1])
    assert len({tuple(r) for r in batch.tolist()}) > 1  # the prompts matter, so the test can fail


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("policy", [ConfidenceThreshold(0.7), FactorRule(1.0)], ids=lambda p: p.name)
def test_finished_rows_leave_the_batch(net, process, cache, policy, cfg_scale):
    """Each prompt takes part in exactly the calls it makes alone, and the network computes only those rows
    (with guidance: those rows twice, conditional and unconditional, also in a cache of 2B rows)."""
    rows_fed = []
    hook = net.register_forward_pre_hook(
        lambda m, args, kw: rows_fed.append((args[0] if args and args[0] is not None else kw["inputs_embeds"]).shape[0]),
        with_kwargs=True)
    kw = dict(gen_length=16, block_length=8, steps=16, policy=policy, cache=cache, cfg_scale=cfg_scale)
    try:
        batch = generate_llada(net, process, PROMPTS, **kw)
    finally:
        hook.remove()
    per_row = batch.nfe_per_row
    assert sum(rows_fed) == (2 if cfg_scale else 1) * int(per_row.sum()) and len(rows_fed) == batch.nfe >= int(per_row.max())  # slowest per block
    assert len(set(per_row.tolist())) > 1  # rows finish at different steps, so the test can fail
    for i, prompt in enumerate(PROMPTS):
        alone = generate_llada(net, process, [prompt], **kw)
        assert torch.equal(batch.tokens[i], alone.tokens[0]) and alone.nfe == int(per_row[i])
    assert batch.tokens_per_nfe == pytest.approx(batch.tokens.numel() / float(per_row.sum()))


def test_soft_masking_schedule_follows_each_row(net, process):
    """With a per-row schedule (stepwise) and rows that finish at different steps, a prompt's tokens are the
    ones it gets alone: each row is scheduled by its own masks left, never by the batch's."""
    from dlm.softmask import build_feedback

    feedback = build_feedback(None, MASK, omega_s=0.9, omega_b=-3.0, schedule="stepwise")
    kw = dict(gen_length=16, block_length=16, steps=16, policy=ConfidenceThreshold(0.8), feedback=feedback)
    batch = generate_llada(net, process, PROMPTS, **kw)
    assert len(set(batch.nfe_per_row.tolist())) > 1
    for i, prompt in enumerate(PROMPTS):
        assert torch.equal(batch.tokens[i], generate_llada(net, process, [prompt], **kw).tokens[0])


def test_per_row_positions(tiny_network):
    """Positions (B, T) broadcast like (T,); left padding + per-row positions + key mask = no padding."""
    net = tiny_network(V, seed=2)
    x = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(0))
    shared = net(x, positions=torch.arange(10))
    per_row = net(x, positions=torch.arange(10).expand(3, 10))
    assert torch.equal(shared, per_row)
    pad = 4
    padded = torch.cat((torch.full((3, pad), 7), x), 1)
    valid = torch.arange(10 + pad) >= pad
    mask = (valid[None, :] | torch.eye(10 + pad, dtype=torch.bool))[None, None]  # pads see themselves only
    positions = (valid.long().cumsum(0) - 1).clamp(min=0).expand(3, -1)
    out = net(padded, positions=positions, attn_mask=mask)[:, pad:]
    torch.testing.assert_close(out, net(x), atol=1e-5, rtol=1e-5)


def test_classifier_free_guidance_formula(net, process):
    """First commit of a guided run = the most confident argmax of u + (s+1)(c - u), u with the prompt masked."""
    s, prompt, gen = 2.0, [1, 5, 6, 7, 9], 8
    out = llada_with_trajectory(net, process, [prompt], gen, gen, gen, cfg_scale=s)
    x = torch.tensor([prompt + [MASK] * gen])
    u_in = x.clone()
    u_in[:, :len(prompt)] = MASK
    with torch.no_grad():
        c, u = net(x), net(u_in)
    probs = subs_logits(u + (s + 1) * (c - u), MASK).double().softmax(-1)[0, len(prompt):]  # (gen, V)
    conf, tok = probs.max(-1)
    first = torch.nonzero(out.trajectory[0][0, len(prompt):] != MASK).flatten().tolist()
    assert first == [int(conf.argmax())]
    assert int(out.trajectory[0][0, len(prompt) + first[0]]) == int(tok[first[0]])


def test_scores_and_gumbel_sampling(process):
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0, float("-inf")]]])  # (1, 1, 5); the last id plays [MASK]
    p = torch.softmax(logits[0, 0, :4].double(), -1)
    for remasking, expected in [("low_confidence", p[0]), ("margin", p[0] - p[1]),
                                ("entropy", (p * p.log()).sum().exp())]:
        x0, score = LLaDASampler(remasking=remasking)._predict(logits, None)
        assert int(x0) == 0 and math.isclose(float(score), float(expected), rel_tol=1e-12)
    # tau > 0: Gumbel-max draws follow softmax(logits / tau)
    tau, n = 0.7, 20000
    sampler = LLaDASampler(temperature=tau)
    x0, _ = sampler._predict(logits.expand(1, n, 5), torch.Generator().manual_seed(0))
    freq = torch.bincount(x0.flatten(), minlength=5).double() / n
    target = torch.softmax(logits[0, 0].double() / tau, -1)
    assert (freq - target).abs().max() < 0.015
    assert freq[4] == 0


def test_suppressed_ids_are_ordered_last_with_predictions_unchanged(net, process):
    logits = torch.full((1, 3, 6), -2.0)
    logits[0, 0, 1], logits[0, 1, 4], logits[0, 2, 2] = 5.0, 9.0, 1.0  # position 1 is the most confident, predicts 4
    for remasking in ["low_confidence", "margin", "entropy"]:
        plain_x0, plain = LLaDASampler(remasking=remasking)._predict(logits, None)
        x0, score = LLaDASampler(remasking=remasking, suppress_ids_in_confidence=(4,))._predict(logits, None)
        assert torch.equal(x0, plain_x0) and x0[0].tolist() == [1, 4, 2]
        assert plain[0, 1] > plain[0, 0] > plain[0, 2]
        assert score[0, 0] > score[0, 2] > score[0, 1]  # suppressed: below every other candidate
    # Suppressing every id shifts all scores alike: the ordering, hence the whole run, is unchanged.
    kw = dict(gen_length=16, block_length=8, steps=8)
    plain = generate_llada(net, process, PROMPTS, **kw).tokens
    every = generate_llada(net, process, PROMPTS, suppress_ids_in_confidence=tuple(range(V)), **kw).tokens
    one = generate_llada(net, process, PROMPTS, suppress_ids_in_confidence=(int(plain[0, 0]),), **kw).tokens
    assert torch.equal(plain, every) and (one != MASK).all()


def test_time_conditioned_network_runs(tiny_network):
    net = tiny_network(V, seed=0, time_conditioning=True)
    proc = MaskedDiffusion(make_schedule("loglinear", 1e-3), mask_id=MASK, time_conditioning=True)
    a = generate_llada(net, proc, PROMPTS, 8, 4, 4, cache="dual", cfg_scale=1.0)
    assert (a.tokens != MASK).all()


@pytest.mark.parametrize("schedule", ["cosine", "linear", "loglinear"])
def test_time_conditioned_network_gets_the_time_of_its_mask_rate(tiny_network, schedule):
    """Each call's t is the time whose mask rate 1 - alpha_t is the row's fraction of generated positions still
    masked (as in training), not the fraction itself (which is right for no schedule but log-linear's)."""
    net = tiny_network(V, seed=0, time_conditioning=True)
    proc = MaskedDiffusion(make_schedule(schedule, 1e-3), mask_id=MASK, time_conditioning=True)
    seen = []
    hook = net.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["t"].clone()), with_kwargs=True)
    try:
        out = llada_with_trajectory(net, proc, [PROMPTS[0]], 8, 8, 8)
    finally:
        hook.remove()
    canvases = [torch.tensor([PROMPTS[0] + [MASK] * 8])] + out.trajectory[:-1]  # what each call saw
    assert len(seen) == len(canvases) == 8
    for t, canvas in zip(seen, canvases):
        rate = float((canvas[0, len(PROMPTS[0]):] == MASK).double().mean())
        if rate == 1.0:  # all masked: t = 1 (where 1 - alpha_1 = 1 - eps)
            assert float(t) == 1.0
        else:
            assert float(1 - proc.schedule.alpha(t.double())) == pytest.approx(rate, abs=1e-6)
    if schedule == "cosine":
        assert float(seen[0]) == pytest.approx(1.0) and abs(float(seen[4]) - 0.5) > 0.05  # half masked: not t = 0.5


def test_bad_arguments(net, process):
    with pytest.raises(ValueError, match="block_length=5 does not divide gen_length=16"):
        generate_llada(net, process, PROMPTS, 16, 5, 16)
    with pytest.raises(ValueError, match="steps=6 is not divisible by the number of blocks"):
        generate_llada(net, process, PROMPTS, 16, 4, 6)
    with pytest.raises(ValueError, match=r"threshold=1.2 must be in \(0, 1\]"):
        generate_llada(net, process, PROMPTS, 16, 4, 16, policy=ConfidenceThreshold(1.2))
    with pytest.raises(ValueError, match="cfg_scale=-1.0 must be >= 0"):
        generate_llada(net, process, PROMPTS, 16, 4, 16, cfg_scale=-1.0)
    with pytest.raises(ValueError, match="remasking='lowest'"):
        generate_llada(net, process, PROMPTS, 16, 4, 16, remasking="lowest")
    with pytest.raises(ValueError, match="cache='kv'"):
        generate_llada(net, process, PROMPTS, 16, 4, 16, cache="kv")
    with pytest.raises(ValueError, match="temperature"):
        generate_llada(net, process, PROMPTS, 16, 4, 16, temperature=-1)


def test_sampler_interface_and_registry(net, process):
    prompt = [1, 5, 6, 7]
    canvas = torch.tensor([prompt + [MASK] * 8] * 2)
    sampler = make_sampler("llada", steps=8, temperature=0.0)
    assert isinstance(sampler, LLaDASampler)
    sampler.block_length = 4
    out = sampler.sample(net, process, Canvas.from_fixed(canvas, canvas != MASK))
    ref = generate_llada(net, process, [prompt, prompt], 8, 4, 8)
    assert torch.equal(out.tokens[:, 4:], ref.tokens) and out.nfe == ref.nfe == 8
    infill = canvas.clone()
    infill[:, -1] = 3
    with pytest.raises(ValueError, match="suffix"):
        sampler.sample(net, process, Canvas.from_fixed(infill, infill != MASK))


def test_pipeline_and_cli(micro_run, capsys):
    import dlm
    from dlm.cli import main

    model = dlm.load(micro_run)
    res = model.generate_prompted(["The", "It was a long"], gen_length=8, block_length=4, steps=8, cache="dual")
    assert len(res.texts) == 2 and res.nfe == 8 and res.tokens[res.generated].view(2, -1).shape == (2, 8)
    assert res.tokens_per_nfe == 1.0 and res.tokens_per_second > 0
    fast = model.generate_prompted(["The"], gen_length=8, block_length=4, steps=8, threshold=1e-3)
    assert fast.nfe == 2  # the top probability is >= 1 / vocab (300) > 1e-3: each block is committed at once
    code = main(["sample", str(micro_run), "--sampler", "llada", "--gen-length", "8", "--block-length", "4",
                 "--steps", "4", "--threshold", "0.9", "--cache", "prefix", "--prompt", "The", "--prompt", "A"])
    out = capsys.readouterr().out
    assert code == 0 and "NFE" in out and "tokens/NFE" in out and out.count("--- sample") == 2


def test_guidance_combines_bf16_halves_in_float32():
    """u + (s + 1)(c - u) from a bf16 network is computed in float32 (a bf16 combination rounds c - u away)."""
    from dlm.sampler.llada_forward import guided_logits

    torch.manual_seed(0)
    cond = (8 + torch.randn(2, 4, 50)).bfloat16()
    uncond = (cond.float() + 0.01 * torch.randn(2, 4, 50)).bfloat16()
    got = guided_logits(torch.cat((cond, uncond)), 2.0)
    want = uncond.float() + 3.0 * (cond.float() - uncond.float())
    assert got.dtype == torch.float32 and torch.equal(got, want)
    in_bf16 = uncond + 3.0 * (cond - uncond)
    assert not torch.equal(in_bf16.float(), want)  # what combining in bf16 would have given


# ------------------------------------------------------------------------------------------ LLaDA's EOS / EoT rule
EOS, EOT = 3, 4


@torch.no_grad()
def eos_heavy(tiny_network, prompt):
    """A network whose EOS and EoT rows of the head copy those of the two tokens it predicts most often after
    `prompt` (plus noise), so that both carry real probability at most positions."""
    net = tiny_network(V, seed=5, std=0.5)
    top = subs_logits(net(torch.tensor([prompt + [MASK] * 16])), MASK)[0, len(prompt):].argmax(-1)
    a, b = torch.bincount(top, minlength=V).topk(2).indices.tolist()
    g = torch.Generator().manual_seed(0)
    net.head.weight[EOS] = net.head.weight[a] + 0.3 * torch.randn(net.head.weight.shape[1], generator=g)
    net.head.weight[EOT] = net.head.weight[b] + 0.3 * torch.randn(net.head.weight.shape[1], generator=g)
    return net


def llada_reference(net, prompt, gen_length, block_length, steps, temperature, seed, eos_eot=False, threshold=None):
    """LLaDA's generate (count schedule, low_confidence; with eos_eot its confidence_eos_eot_inf), or with `threshold`
    Fast-dLLM's LLaDA generate without cache (each call commits its most confident prediction and every other one
    at or above the threshold, until the block is full), on one prompt: the canvas after every call. The prediction
    is the argmax of logits / temperature + Gumbel noise from float64 uniforms of the row's generator (LLaDA's
    exp(logits) / (-log u)^temperature has the same argmax). confidence_eos_eot_inf: the EoT logit, and at
    temperature 0 the EOS logit too (LLaDA's noisy logits are then the logits themselves), is set to -inf in the
    logits the confidences are computed from."""
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor([prompt + [MASK] * gen_length])
    P, blocks = len(prompt), gen_length // block_length
    per_block, canvases = steps // blocks, []
    for block in range(blocks):
        lo, hi = P + block * block_length, P + (block + 1) * block_length
        masks = int((x[0, lo:hi] == MASK).sum())
        counts = [masks // per_block + (1 if i < masks % per_block else 0) for i in range(per_block)]
        while bool((x[0, lo:hi] == MASK).any()):
            with torch.no_grad():
                logits = subs_logits(net(x), MASK)[0, lo:hi].double()  # (b, V) x_theta of the block
            if temperature > 0:
                u = torch.rand(logits.shape, generator=g, dtype=torch.float64)
                x0 = (logits / temperature - torch.log(-torch.log(u))).argmax(-1)
            else:
                x0 = logits.argmax(-1)
            if eos_eot:
                logits[:, EOT] = -math.inf
                if temperature == 0:
                    logits[:, EOS] = -math.inf
            conf = logits.softmax(-1).gather(-1, x0[:, None])[:, 0]
            conf = torch.where(x[0, lo:hi] == MASK, conf, -math.inf)
            order = torch.argsort(conf, descending=True, stable=True)
            if threshold is None:
                pick = order[:counts.pop(0)]
            else:
                pick = order[:1 + int((conf[order[1:]] >= threshold).sum())]
            x[0, lo + pick] = x0[pick]
            canvases.append(x[0].clone())
    return canvases


def llada_run(net, process, prompt, seed, **options):
    """The llada sampler on one prompt of 16 tokens to generate: the canvas after every call."""
    from dlm.sampler import TrajectoryRecorder

    rec = TrajectoryRecorder()
    sampler = make_sampler("llada", **options)
    sampler.sample(net, process, Canvas.left_padded([prompt], 16, process), [torch.Generator().manual_seed(seed)], rec)
    return [c[0] for c in rec.canvases]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("block_length,steps,threshold", [(16, 8, None), (8, 8, None), (4, 16, None), (8, 8, 0.5),
                                                          (4, 8, 0.2)])
def test_llada_gives_llada_and_fast_dllm_generate_order_and_tokens(net, process, temperature, block_length, steps,
                                                                   threshold):
    """The canvas after every call (order, tokens and the number of calls) of LLaDA's generate (count schedule) and
    of Fast-dLLM's (confidence threshold), at steps < length."""
    prompt = [1, 5, 6, 7]
    want = llada_reference(net, prompt, 16, block_length, steps, temperature, 4, threshold=threshold)
    got = llada_run(net, process, prompt, 4, steps=steps, block_length=block_length, temperature=temperature,
                    threshold=threshold)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("block_length", [16, 8])
def test_confidence_eos_eot_inf_is_llada_rule_and_differs_from_suppression(tiny_network, process, temperature,
                                                                          block_length):
    """Order and tokens (the canvas after every step) of LLaDA's rule, on a model where EOS and EoT carry
    probability; suppress_ids_in_confidence (dlm's rule: those predictions last, the others' order unchanged) gives
    another run there."""
    prompt = [1, 5, 6, 7]
    net = eos_heavy(tiny_network, prompt)
    with torch.no_grad():
        probs = subs_logits(net(torch.tensor([prompt + [MASK] * 16])), MASK).softmax(-1)[0, 4:]
    assert float(probs[:, [EOS, EOT]].sum(-1).mean()) > 0.1  # EOS / EoT are not negligible here

    def run(**option):
        return llada_run(net, process, prompt, 3, steps=8, block_length=block_length, temperature=temperature, **option)

    want = llada_reference(net, prompt, 16, block_length, 8, temperature, 3, eos_eot=True)
    got = run(confidence_eos_eot_inf=(EOS, EOT))
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    old = run(suppress_ids_in_confidence=(EOS, EOT))
    assert any(not torch.equal(a, b) for a, b in zip(old, want))  # the old option is not LLaDA's rule


def test_confidence_eos_eot_inf_renormalises_each_position_by_its_own_factor():
    """Two positions, p = 0.5 each on their prediction; position 0 puts 0.4 on EoT, position 1 none: LLaDA's rule
    scores them 0.5 / 0.6 and 0.5, so position 0 now comes first (suppression would keep their order)."""
    probs = torch.tensor([[[0.5, 0.1, 0.0, 0.0, 0.4], [0.5, 0.3, 0.2, 0.0, 0.0]]])  # (1, 2, 5): EoT is id 4
    logits = torch.log(probs.clamp_min(1e-30))
    _, score = LLaDASampler(confidence_eos_eot_inf=(3, 4))._predict(logits, None)
    assert torch.allclose(score[0], torch.tensor([0.5 / 0.6, 0.5], dtype=torch.float64), atol=1e-9)
    with pytest.raises(ValueError, match=r"takes two token ids, \(EOS, EoT\)"):
        make_sampler("llada", confidence_eos_eot_inf=(3,))
