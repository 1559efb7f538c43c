"""The lm-evaluation-harness adapter (dlm/eval/harness/): exact AR likelihoods, the diffusion Monte Carlo bound
against `nelbo` and against LLaDA's published estimator, its standard error, batch invariance, greedy checks, stop
strings, and the shipped offline tasks end to end (lm_eval's runner and `dlm eval --harness`)."""

import json
import math
import statistics

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from dlm.eval.harness.estimator import Row, draw_masks, exact_ar, greedy_rows, stratified_levels  # noqa: E402
from dlm.eval.harness.model import DLMHarnessLM  # noqa: E402
from tests.golden.cases import models as golden_models  # noqa: E402

CTX, CONT = "And the king said unto", " the people of the land"


@pytest.fixture(scope="module")
def models():
    return golden_models()  # tiny random float32 networks (2 layers, width 32) and a 300-token BPE


@pytest.fixture(autouse=True)
def harness_data(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DLM_HARNESS_DATA", str(tmp_path_factory.getbasetemp() / "harness-data"))


def req(kind, *args, task="t"):
    return Instance(kind, {}, tuple(args), 0, (task, 0, 1))


def lm(model, **kw):
    return DLMHarnessLM(model=model, precision="32", **kw)


# ------------------------------------------------------------------------------------------------ autoregressive
def test_ar_loglikelihood_is_the_exact_sum_of_token_log_probs(models):
    """Against a token-by-token left-to-right computation (one prefix per call) and the process's exact nelbo."""
    model = models["ar"]
    (est, greedy), = lm(model).loglikelihood([req("loglikelihood", CTX, CONT)])
    ctx, cont = model.encode(CTX), model.encode(CTX + CONT)[len(model.encode(CTX)):]
    ids = [model.tokenizer.bos_token_id] + ctx + cont
    ref = 0.0
    for i in range(len(ctx) + 1, len(ids)):
        logits = model.network.next_token_logits(torch.tensor([ids[:i]]))[0, -1]
        ref += float(logits.detach().double().log_softmax(-1)[ids[i]])
    assert est.exact and est.stderr == 0.0 and est.tokens == len(cont)
    assert float(est) == pytest.approx(ref, rel=1e-5)
    x = torch.tensor([ids])
    batch = {"input_ids": x, "loss_mask": torch.ones_like(x, dtype=torch.bool),
             "given": torch.arange(len(ids))[None] < len(ctx) + 1}
    assert float(est) == pytest.approx(-float(model.process.nelbo(model.network, batch).nll_sum), rel=1e-5)


def test_ar_is_greedy_when_the_continuation_is_the_argmax_chain(models):
    model = models["ar"]
    ids = [model.tokenizer.bos_token_id] + model.encode(CTX)
    start = len(ids)
    for _ in range(4):  # the greedy continuation, token by token
        ids.append(int(model.network.next_token_logits(torch.tensor([ids]))[0, -1].argmax()))
    wrong = ids[:-1] + [(ids[-1] + 1) % 300]
    out = exact_ar(model.process, model.network, [Row(ids, start), Row(wrong, start)], 8, 0)
    assert [g for _, g in out] == [True, False]


# ------------------------------------------------------------------------------------------------ diffusion
def test_diffusion_estimate_is_within_monte_carlo_error_of_nelbo(models):
    """LLaDA's stratified estimator and the process's continuous-time NELBO have the same expectation (the
    continuation given the context): ∫ (1/t) Binom(k; L, t) dt = 1/k. Compared within 4 combined standard errors
    (nelbo's from the spread of 8 seeds); the schedule's eps = 1e-3 end points move nelbo by far less."""
    model = models["mdlm"]
    (est, _), = lm(model, mc_num=512, mc_groups=16).loglikelihood([req("loglikelihood", CTX, CONT)])
    ctx = model.encode(CTX)
    ids = [model.tokenizer.bos_token_id] + ctx + model.encode(CTX + CONT)[len(ctx):]
    x = torch.tensor([ids])
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x, dtype=torch.bool),
             "loss_mask": torch.ones_like(x, dtype=torch.bool), "given": torch.arange(len(ids))[None] < len(ctx) + 1}
    bounds = [model.nelbo(batch, num_t_samples=64, seed=s, precision="32")[0] for s in range(8)]
    se_nelbo = statistics.stdev(bounds) / math.sqrt(len(bounds))
    assert est.stderr > 0 and not est.exact
    assert abs(float(est) + statistics.mean(bounds)) < 4 * math.hypot(est.stderr, se_nelbo)


@pytest.mark.parametrize("estimator", ["llada", "process"])
def test_reported_standard_error_matches_the_spread_over_seeds(models, estimator):
    """The standard deviation of 24 estimates (seeds 0..23, mc_num 32 in 8 groups) against the mean reported
    standard error: a sample standard deviation of 24 values is within ±30 % of the truth with ~95 % probability
    (relative s.e. 1/sqrt(2·23) ≈ 15 %), and the 24 reported errors average their own ~25 % noise away."""
    model = models["mdlm"]
    ests = [lm(model, mc_num=32, mc_groups=8, seed=s, estimator=estimator).loglikelihood(
        [req("loglikelihood", CTX, CONT)])[0][0] for s in range(24)]
    spread = statistics.stdev(float(e) for e in ests)
    reported = statistics.mean(e.stderr for e in ests)
    assert 0.6 < spread / reported < 1.5, (spread, reported)


def test_results_do_not_depend_on_the_batch(models):
    """Three requests of different lengths at batch sizes 1, 5 and 64: the same estimates (float32; the network's
    kernels see other shapes, hence the 1e-5 tolerance) and the same greedy flags; a different seed differs."""
    requests = [req("loglikelihood", CTX, CONT), req("loglikelihood", "The Lord", " is my shepherd"),
                req("loglikelihood", "", "In the beginning")]
    outs = [lm(models["mdlm"], mc_num=16, mc_groups=4, batch_size=b).loglikelihood(requests) for b in (1, 5, 64)]
    for out in outs[1:]:
        for (a, ga), (b, gb) in zip(outs[0], out):
            assert float(a) == pytest.approx(float(b), rel=1e-5, abs=1e-5) and ga == gb
            assert a.stderr == pytest.approx(b.stderr, rel=1e-4, abs=1e-5)
    other = lm(models["mdlm"], mc_num=16, mc_groups=4, seed=1).loglikelihood(requests)
    assert float(other[0][0]) != float(outs[0][0][0])


def test_process_estimator_is_batch_invariant_and_near_the_llada_one(models):
    requests = [req("loglikelihood", CTX, CONT), req("loglikelihood", "The Lord", " is my shepherd")]
    a = lm(models["mdlm"], estimator="process", mc_num=64, batch_size=1).loglikelihood(requests)
    b = lm(models["mdlm"], estimator="process", mc_num=64, batch_size=8).loglikelihood(requests)
    c = lm(models["mdlm"], mc_num=64, mc_groups=8).loglikelihood(requests)
    for (x, _), (y, _), (z, _) in zip(a, b, c):
        assert float(x) == pytest.approx(float(y), rel=1e-5)
        assert abs(float(x) - float(z)) < 4 * math.hypot(x.stderr, z.stderr)


@pytest.mark.parametrize("process", ["bd3lm", "esolm", "udlm", "gidd", "sedd", "mdlm_sc"])
def test_every_process_is_scored_through_its_contract(process):
    """Non-MDLM processes get their own bound (`estimator=process`), batch-invariant (BD3-LM's rows padded to its
    blocks); the self-conditioned MDLM gets LLaDA's estimator on its plain pass."""
    from dlm.build import build_network, build_process
    from dlm.config import build_config
    from dlm.pipeline import DiffusionLM
    from tests.golden.cases import tokenizer

    tok = tokenizer()
    cfg = build_config(["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.context=32",
                        "data.vocab_size=300", f"process={process}"])
    cfg.model.vocab_size = len(tok)
    torch.manual_seed(0)
    model = DiffusionLM(build_network(cfg), build_process(cfg, tok.mask_token_id), tok, cfg)
    requests = [req("loglikelihood", CTX, CONT), req("loglikelihood", "The Lord", " is my shepherd")]
    a = lm(model, mc_num=8, mc_groups=2, batch_size=1).loglikelihood(requests)
    b = lm(model, mc_num=8, mc_groups=2, batch_size=8).loglikelihood(requests)
    assert lm(model).estimator == ("llada" if process == "mdlm_sc" else "process")
    for (x, _), (y, _) in zip(a, b):
        assert math.isfinite(float(x)) and float(x) < 0 and x.stderr > 0
        assert float(x) == pytest.approx(float(y), rel=1e-5)


def test_stratified_levels_cover_the_range_evenly():
    for length, b in ((5, 16), (16, 16), (40, 8)):
        for k in range(1, length + 1):
            lv = stratified_levels(k, b, length)
            assert int(lv.min()) >= 1 and int(lv.max()) <= length
            if b == length:  # every level exactly once
                assert sorted(lv.tolist()) == list(range(1, length + 1))
    levels, masks = draw_masks(7, 32, 4, torch.Generator().manual_seed(0))
    assert masks.shape == (32, 7) and (masks.sum(1) == levels).all()


def test_diffusion_is_greedy_for_the_confidence_order_greedy_fill(models):
    """Decode a continuation greedily (most confident position first) by hand; greedy_rows accepts it, and
    refuses it with one token changed."""
    model = models["mdlm"]
    process, net, mask = model.process, model.network, model.process.mask_id
    ids = [model.tokenizer.bos_token_id] + model.encode(CTX)
    n, z = len(ids), torch.tensor([ids + [mask] * 3])
    for _ in range(3):
        logp = process.denoise(process.forward_logits(net, z, None))[0].log_softmax(-1)  # (T, V)
        conf, best = logp.max(-1)
        conf[z[0] != mask] = -math.inf
        i = int(conf.argmax())
        z[0, i] = best[i]
    fill = z[0].tolist()
    wrong = fill[:-1] + [(fill[-1] + 1) % 299]
    flags, calls = greedy_rows(process, net, [Row(fill, n), Row(wrong, n)], 4, 0)
    assert flags == [True, False] and calls[0] == 3 and 1 <= calls[1] <= 3


# ------------------------------------------------------------------------------------------------ LLaDA layout
def test_llada_folder_estimate_equals_the_published_formula(tmp_path):
    """A tiny LLaDA-layout folder (OLMo names, no BOS) through dlm.load, against LLaDA's get_log_likelihood
    written here from its published formula, with transformers' Llama model (the same weights, run
    bidirectionally) as the network and the same draws: per group of b draws, k ~ U{1..L}, levels
    x = round(linspace(k, k + (b-1) L/b, b)) wrapped into 1..L, each row's first x of L positions masked then
    permuted; loss = sum over masked of CE / (x / L), / b; the result is minus the mean over groups."""
    from tests.network.checkpoints import LLADA_VOCAB, all_visible, llada_checkpoint
    from tests.test_open_models import word_tokenizer

    torch.manual_seed(0)
    llama = llada_checkpoint(tmp_path).eval()
    word_tokenizer(tmp_path, LLADA_VOCAB, 126336, 126081)
    adapter = DLMHarnessLM(pretrained=str(tmp_path), mc_num=12, mc_groups=3, precision="32", seed=5)
    ctx, cont = "w5 w6 w7 w8", " w9 w10 w11 w12 w13"
    (est, _), = adapter.loglikelihood([req("loglikelihood", ctx, cont)])
    (row,) = adapter.rows_of([([5, 6, 7, 8], [9, 10, 11, 12, 13])])  # the request's ids and its seeded generator
    assert row.ids == list(range(5, 14)) and row.n_given == 4
    g, seq = row.generator, torch.tensor(row.ids)
    L, b, losses = 5, 4, []
    for _ in range(3):
        k = torch.randint(1, L + 1, (), generator=g)
        x = torch.round(torch.linspace(float(k), k + (b - 1) * (L / b), steps=b)).long()
        x = ((x - 1) % L) + 1
        is_mask = torch.arange(L).repeat(b, 1) < x[:, None]
        for i in range(b):
            is_mask[i] = is_mask[i][torch.randperm(L, generator=g)]
        is_mask = torch.cat([torch.zeros(b, 4, dtype=torch.bool), is_mask], 1)
        noisy = torch.where(is_mask, 126336, seq.repeat(b, 1))
        with torch.no_grad():
            logits = llama(noisy, attention_mask=all_visible(b, len(seq))).logits
        p_mask = (x / L)[:, None].repeat(1, len(seq))
        ce = torch.nn.functional.cross_entropy(logits[is_mask].double(), seq.repeat(b, 1)[is_mask], reduction="none")
        losses.append(float((ce / p_mask[is_mask]).sum() / b))
    assert float(est) == pytest.approx(-sum(losses) / len(losses), rel=1e-4)


# ------------------------------------------------------------------------------------------------ generation
def test_generate_until_stops_at_the_stop_strings(models):
    for name in ("mdlm", "ar"):
        model = lm(models[name], steps=8)
        (full,) = model.generate_until([req("generate_until", CTX, {"until": [], "max_gen_toks": 8})])
        assert len(full) > 4
        stop = full[2:4]
        (cut,) = model.generate_until([req("generate_until", CTX, {"until": [stop], "max_gen_toks": 8})])
        assert cut == full[:full.index(stop)] and stop not in cut
        s = model.summary()["t/generate_until"]
        assert s["requests"] == 2 and s["nfe_per_request"] > 0 and s["tokens_per_forward"] > 0


def test_rolling_is_the_sum_over_windows_and_exact_for_ar(models):
    """A text longer than the context (32 tokens): windows of P = 30 predicted tokens (BOS + one token of context
    + 30 = 32), the first after BOS alone, the next ones after the token before them, the last shorter one after as
    many tokens before it as fill 32 (lm_eval's rolling windows); for AR the sum of exact log-probabilities."""
    text = "In the beginning God created the heaven and the earth. " * 4
    model = models["ar"]
    (est,) = lm(model).loglikelihood_rolling([req("loglikelihood_rolling", text)])
    ids = model.encode(text)
    assert est.tokens == len(ids) and est.exact and len(ids) > 31
    bos, ref, P = model.tokenizer.bos_token_id, 0.0, 30
    for s in range(0, len(ids), P):
        window = ids[s:s + P]
        ctx = [] if s == 0 else ids[max(0, s - (P + 1 - len(window))):s]
        row = [bos] + ctx + window
        assert len(row) <= 32
        logp = model.network.next_token_logits(torch.tensor([row[:-1]]))[0].double().log_softmax(-1)
        first = len(row) - len(window) - 1
        ref += float(sum(logp[i, row[i + 1]] for i in range(first, len(row) - 1)).detach())
    assert float(est) == pytest.approx(ref, rel=1e-5)
    (d,) = lm(models["mdlm"], mc_num=8, mc_groups=2).loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert d.tokens == len(ids) and d.stderr > 0 and float(d) < 0


# ------------------------------------------------------------------------------------------------ end to end
def test_shipped_tasks_run_end_to_end_through_dlm_eval_harness(models, tmp_path, capsys):
    """`dlm eval MODEL --harness dlm_text,dlm_sudoku --limit 2 --output JSON` on a saved micro MDLM."""
    from dlm.cli import main

    folder = tmp_path / "mdlm"
    models["mdlm"].save_pretrained(folder)
    out = tmp_path / "h.json"
    assert main(["eval", str(folder), "--harness", "dlm_text,dlm_sudoku", "--limit", "2", "--mc-num", "8",
                 "--mc-groups", "2", "--steps", "4", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dlm_cloze" in printed and "mc_stderr_mean_ll" in printed and "tokens/forward" in printed
    res = json.loads(out.read_text())
    assert set(res["results"]) >= {"dlm_ppl", "dlm_cloze", "dlm_continuation", "dlm_sudoku"}
    assert res["results"]["dlm_cloze"]["mc_stderr_mean_ll,none"] > 0
    assert res["results"]["dlm_ppl"]["word_perplexity,none"] > 1
    assert res["dlm"]["dlm_cloze/loglikelihood"]["mc_num"] == 8
    assert res["dlm"]["dlm_sudoku/generate_until"]["requests"] == 2


def test_lm_eval_command_line_gets_the_dlm_model_and_tasks(monkeypatch):
    """`python -m dlm.eval.harness ARGS` registers "dlm" in lm_eval's registry and runs lm_eval's own command line
    with dlm's task folder on the include path (running it for real indexes lm_eval's ~10,000 task files: ~20 s,
    done by hand in docs/harness.md)."""
    import lm_eval.__main__
    from lm_eval.api.registry import get_model

    from dlm.eval.harness import TASKS_DIR
    from dlm.eval.harness.__main__ import main

    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(__import__("sys").argv)))
    assert main(["--model", "dlm", "--model_args", "pretrained=x", "--tasks", "dlm_cloze"]) == 0
    assert get_model("dlm") is DLMHarnessLM
    assert seen == [["lm-eval", "--model", "dlm", "--model_args", "pretrained=x", "--tasks", "dlm_cloze",
                     "--include_path", str(TASKS_DIR)]]


def test_bad_task_names_and_missing_lm_eval_exit_2(models, tmp_path, capsys, monkeypatch):
    from dlm.cli import main

    folder = tmp_path / "m"
    models["mdlm"].save_pretrained(folder)
    assert main(["eval", str(folder), "--harness", "dlm_nope"]) == 2
    assert "unknown lm-eval task: dlm_nope" in capsys.readouterr().err
    assert main(["eval", str(folder), "--mc-num", "4"]) == 2
    assert "--mc-num: only with --harness" in capsys.readouterr().err
    import sys

    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails as when it is not installed
    assert main(["eval", str(folder), "--harness", "dlm_cloze"]) == 2
    assert "pip install 'dlm[eval]'" in capsys.readouterr().err


def test_task_files_are_deterministic_and_come_from_the_test_split(tmp_path):
    """`python -m dlm.eval.harness data --out DIR` writes the four files; they equal a fresh build (selection by a
    text hash, no randomness) and every cloze / continuation example lies in the embedded corpus's test split."""
    from dlm.data.corpus import load_texts
    from dlm.eval.harness.__main__ import main
    from dlm.eval.harness.data import SIZES, build

    assert main(["data", "--out", str(tmp_path)]) == 0
    rows = {n: [json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()] for n in SIZES}
    assert {n: len(r) for n, r in rows.items()} == SIZES
    for name in SIZES:
        assert [{k: v for k, v in r.items() if k != "version"} for r in rows[name]] == build(name)
    test = "\n".join(load_texts("embedded", split="test"))
    for r in rows["cloze"][:50]:
        assert (r["context"] + r["target"]) in test and r["target"][1:].isalpha()
    for r in rows["continuation"][:50]:
        assert len(r["target"].split()) == 3 and r["context"].rstrip("\n") in test
    assert all(len(r["puzzle"]) == 16 and r["puzzle"].count(".") == 10 for r in rows["sudoku"])


@pytest.mark.parametrize("family", ["llama", "gpt2", "dream", "sdar"])
def test_open_folders_are_scored(family, tmp_path):
    """Open checkpoint folders through dlm.load: causal LMs exactly (against a token-by-token computation, only the
    continuation's positions getting logits), Dream (shifted predictions) by LLaDA's estimator, SDAR (block-causal)
    by its process's bound."""
    from tests.test_open_families_samplers import write_family

    write_family(tmp_path, family)
    adapter = DLMHarnessLM(pretrained=str(tmp_path), mc_num=8, mc_groups=2, precision="32")
    (est, _), = adapter.loglikelihood([req("loglikelihood", "w5 w6 w7", " w8 w9")])
    model = adapter.model
    assert adapter.estimator == {"llama": "exact", "gpt2": "exact", "dream": "llada", "sdar": "process"}[family]
    assert math.isfinite(float(est)) and float(est) < 0
    if model.is_autoregressive:
        ids = adapter.start + model.encode("w5 w6 w7 w8 w9")
        ref = sum(float(model.network.next_token_logits(torch.tensor([ids[:i]]))[0, -1].detach().double()
                        .log_softmax(-1)[ids[i]]) for i in range(len(ids) - 2, len(ids)))
        assert float(est) == pytest.approx(ref, rel=1e-5)
