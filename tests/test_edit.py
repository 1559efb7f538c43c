"""Instant edit (`DiffusionLM.edit`, dlm/edit.py): spans refused outside the text, untouched text kept byte for
byte, auto mode restoring corrupted tokens (exactly, with an oracle network), determinism and NFE counting."""

import pytest
import torch

from dlm.network.base import select_positions
from dlm.pipeline import DiffusionLM
from tests.golden.cases import models, tokenizer

TEXT = "And the king said unto the people, go."


@pytest.fixture(scope="module")
def golden():
    return models()


class Oracle(torch.nn.Module):
    """A network that knows the clean text: at every position it puts probability ~1 on `target`'s token there,
    whatever it is given, and counts its calls."""

    def __init__(self, cfg, target: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.embed = torch.nn.Embedding(cfg.vocab_size, 4)
        self.register_buffer("target", target)
        self.calls = 0

    def forward(self, input_ids=None, inputs_embeds=None, t=None, attn_mask=None, causal=False, positions=None,
                kv_cache=None, cache_update=False, return_hidden=False, logits_at=None):
        self.calls += 1
        B, L = input_ids.shape
        logits = torch.full((B, L, self.cfg.vocab_size), -10.0)  # (B, L, V)
        logits[:, torch.arange(L), self.target[:L]] = 10.0
        return select_positions(logits, logits_at)


def oracle_model(golden, clean: str) -> DiffusionLM:
    base = golden["mdlm"]
    tok = base.tokenizer
    target = torch.tensor([tok.bos_token_id] + tok(clean, add_special_tokens=False)["input_ids"])
    return DiffusionLM(Oracle(base.network.cfg, target), base.process, tok, base.cfg)


def corrupt(tok, clean: str, positions: list[int], seed: int = 0) -> str:
    """The clean text with the tokens at `positions` (0-based among its tokens) replaced by random tokens, such
    that the corrupted text tokenizes back to exactly the corrupted ids (positions stay aligned)."""
    ids = tok(clean, add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(seed)
    special = set(tok.all_special_ids)
    for p in positions:
        for _ in range(1000):
            new = list(ids)
            new[p] = int(torch.randint(len(tok), (1,), generator=g))
            text = tok.decode(new, clean_up_tokenization_spaces=False)
            if new[p] != ids[p] and new[p] not in special and tok(text, add_special_tokens=False)["input_ids"] == new:
                ids = new
                break
        else:
            raise AssertionError(f"no substitution at {p} tokenizes back")
    return tok.decode(ids, clean_up_tokenization_spaces=False)


# ------------------------------------------------------------------------------------ spans
@pytest.mark.parametrize("spans, words", [([(3, 99)], "outside the text"), ([(-1, 4)], "outside the text"),
                                           ([(8, 4)], "outside the text"), ([(2, 8), (6, 10)], "overlap"),
                                           ([(4, 4)], "empty"), ([], "spans is empty"), ([(1.5, 3)], "integers"),
                                           ([(1, 3, 0)], "at least 1")])
def test_bad_spans_are_refused_with_the_reason(golden, spans, words):
    with pytest.raises(ValueError, match=words):
        golden["mdlm"].edit(TEXT, spans)


def test_text_outside_the_spans_is_kept_byte_for_byte(golden):
    text = "And  the king,\tsaid\n  go."
    for name in ("mdlm", "bd3lm", "sm"):
        out = golden[name].edit(text, [(5, 13), (22, 24)], seed=3)
        assert out.mode == "rewrite" and out.rounds == 1
        assert out.text.startswith(text[:5]) and out.text.endswith(text[24:]), (name, out.text)
        assert text[13:22] in out.text
        rebuilt, pos = [], 0
        for c in out.changes:  # every change lies inside a span and the diff rebuilds the new text
            assert (5 <= c.start and c.end <= 13) or (22 <= c.start and c.end <= 24), c
            assert text[c.start:c.end] == c.old
            rebuilt += [text[pos:c.start], c.new]
            pos = c.end
        assert "".join(rebuilt) + text[pos:] == out.text
        assert all(out.text[c.new_start:c.new_end] == c.new for c in out.changes)


def test_auto_mode_limited_to_spans_keeps_the_rest(golden):
    out = golden["mdlm"].edit(TEXT, [(8, 22)], mode="auto", threshold=1.0, budget=1.0, seed=1)
    assert out.text[:7] == TEXT[:7] and out.text.endswith(TEXT[22:])
    assert out.changes and all(8 <= c.start and c.end <= 22 for c in out.changes)


def test_no_space_is_added_before_the_text(golden):
    """A word-initial token (" the") written at the very start of the text brings no space with it."""
    tok = golden["mdlm"].tokenizer
    model = oracle_model(golden, TEXT)
    (the,) = tok(" the", add_special_tokens=False)["input_ids"]
    model.network.target[1] = the  # "And" is "A" "nd": the oracle writes " the" "nd"
    out = model.edit(TEXT, [(0, 3)])
    assert out.text == "thend" + TEXT[3:] and out.changes[0].new == "thend" and out.changes[0].start == 0


def test_template_and_infill_fill_their_gaps(golden):
    model = golden["mdlm"]
    out = model.edit(template="In the beginning [MASK*4] and the earth.", seed=2)
    assert out.text.startswith("In the beginning ") and out.text.endswith(" and the earth.")
    assert len(out.changes) == 1 and len(out.changes[0].new_ids) == 4 and out.changes[0].old == "[MASK*4]"
    mid = model.infill("In the beginning", " and the earth.", 3, seed=2)
    assert mid.text.startswith("In the beginning") and mid.text.endswith(" and the earth.")
    assert len(mid.changes) == 1 and len(mid.changes[0].new_ids) == 3 and mid.changes[0].old == ""


def test_refusals_name_the_problem(golden):
    with pytest.raises(ValueError, match="autoregressive"):
        golden["ar"].edit(TEXT)
    with pytest.raises(ValueError, match="one of them"):
        golden["mdlm"].edit()
    with pytest.raises(ValueError, match="unknown edit mode"):
        golden["mdlm"].edit(TEXT, mode="magic")
    with pytest.raises(ValueError, match="threshold"):
        golden["mdlm"].edit(TEXT, threshold=0.0)
    with pytest.raises(ValueError, match="context"):
        golden["mdlm"].edit(TEXT * 5)
    with pytest.raises(ValueError, match="empty"):
        golden["mdlm"].edit("   ")


# ------------------------------------------------------------------------------------ auto mode
def test_auto_mode_restores_every_corrupted_token_with_an_oracle(golden):
    tok = golden["mdlm"].tokenizer
    n = len(tok(TEXT, add_special_tokens=False)["input_ids"])
    bad = [2, n // 2, n - 3]
    corrupted = corrupt(tok, TEXT, bad)
    model = oracle_model(golden, TEXT)
    out = model.edit(corrupted, seed=0, budget=0.2)
    assert out.text == TEXT
    assert out.changed_tokens == len(bad)
    assert sorted(torch.nonzero(out.tokens != out.original_tokens).squeeze(1).tolist()) == [p + 1 for p in bad]
    assert out.stopped == "confident" and out.rounds == 1 and out.remasked == [len(bad)]
    assert out.nfe == model.network.calls  # every network call counted: scoring rounds and sampler steps
    clean = model.edit(TEXT, seed=0)  # a clean text is left alone after one scoring call
    assert clean.text == TEXT and clean.changes == [] and clean.nfe == 1 and clean.stopped == "confident"


def test_auto_mode_never_writes_a_special_token(golden):
    """An oracle that wants EOS where a corrupted token is: the token stays (EOS would cut the text), the
    other corrupted token is restored."""
    tok = golden["mdlm"].tokenizer
    n = len(tok(TEXT, add_special_tokens=False)["input_ids"])
    corrupted = corrupt(tok, TEXT, [2, n - 3])
    model = oracle_model(golden, TEXT)
    model.network.target[3] = tok.eos_token_id  # canvas position of token 2 (BOS first)
    out = model.edit(corrupted, seed=0, budget=0.2)
    assert tok.eos_token_id not in out.tokens.tolist()
    assert out.changed_tokens == 1 and out.tokens[n - 2] == model.network.target[n - 2]
    assert out.tokens[3] == out.original_tokens[3]


def test_auto_budget_spreads_the_repairs_over_rounds(golden):
    tok = golden["mdlm"].tokenizer
    bad = [1, 4, 7, 10]
    out = oracle_model(golden, TEXT).edit(corrupt(tok, TEXT, bad, seed=1), budget=0.1, max_rounds=8)
    per_round = max(1, -(-len(tok(TEXT, add_special_tokens=False)["input_ids"]) // 10))
    assert out.text == TEXT and max(out.remasked) <= per_round and sum(out.remasked) == len(bad)


def test_scores_are_the_masked_probabilities(golden):
    """Each token's score is x_theta of it with that token masked (its group's other tokens masked too): with
    groups = the number of tokens, exactly the per-token pseudo-likelihood, checked against one call per token."""
    from dlm.edit import score_tokens

    model = golden["mdlm"]
    ids = torch.tensor([model.tokenizer.bos_token_id] + model.encode(TEXT))
    editable = torch.arange(len(ids)) > 0
    got = score_tokens(model.network, model.process, ids, editable, groups=len(ids))
    for i in (1, 5, len(ids) - 1):
        z = ids.clone()
        z[i] = model.process.mask_id
        t = model.process.time_of_mask_rate(torch.tensor([1.0 / len(ids)], dtype=torch.float64)).float()
        x = model.process.denoise(model.process.forward_logits(model.network, z[None], t))[0, i]
        assert torch.allclose(got[i], x.softmax(-1)[ids[i]], atol=1e-5)
    assert got[0] == 1.0


@pytest.mark.parametrize("sampler, options", [("ancestral", {}), ("first_hitting", {}), ("remdm_cap", {}),
                                              ("remdm_loop", {}), ("blockwise", {"block_length": 8})])
def test_every_infilling_sampler_rewrites_spans(golden, sampler, options):
    out = golden["mdlm"].edit(TEXT, [(4, 12)], sampler=sampler, seed=1, **options)
    assert out.text.startswith("And ") and out.text.endswith(TEXT[12:]) and out.nfe >= 1


def test_a_prompt_only_sampler_is_refused(golden):
    with pytest.raises(ValueError, match="suffix"):
        golden["mdlm"].edit(TEXT, [(4, 12)], sampler="llada")


def test_edit_is_deterministic_for_a_seed(golden):
    model = golden["mdlm"]
    a = model.edit(TEXT, seed=5, temperature=1.0)
    b = model.edit(TEXT, seed=5, temperature=1.0)
    assert a.text == b.text and torch.equal(a.tokens, b.tokens) and a.nfe == b.nfe
    s = model.edit(TEXT, [(4, 12)], seed=5, temperature=1.0, sampler="remdm_conf")
    assert s.text == model.edit(TEXT, [(4, 12)], seed=5, temperature=1.0, sampler="remdm_conf").text


def test_nfe_counts_the_network_calls(golden):
    model = golden["mdlm"]
    calls = []
    hook = model.network.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = model.edit(TEXT, seed=0, sampler="ancestral", steps=4, max_rounds=2, threshold=1.0)
        spans = model.edit(TEXT, [(4, 12)], seed=0, sampler="ancestral", steps=4)
    finally:
        hook.remove()
    assert out.nfe + spans.nfe == len(calls)
    # per round: a score call, 4 steps, a final argmax call when a mask is left after them; one more score call
    # after the last round (unless a round changed nothing)
    assert 1 <= out.rounds <= 2 and out.rounds * 5 <= out.nfe <= out.rounds * 6 + 1 and 4 <= spans.nfe <= 5


@pytest.mark.parametrize("seed", range(4))
def test_auto_mode_never_lowers_the_pseudo_likelihood(golden, seed):
    """A round that makes the text less likely under the model's own scores is undone: on a random network
    (whose regenerations are as likely to hurt as to help), the result scores at least as high as the input."""
    from dlm.edit import score_tokens

    model = golden["mdlm"]
    out = model.edit(TEXT, seed=seed, threshold=1.0, budget=0.5, max_rounds=3, temperature=1.0)

    def pll(ids):
        scores = score_tokens(model.network, model.process, ids, out.editable)
        return float(scores[out.editable].log().sum())

    assert pll(out.tokens) >= pll(out.original_tokens)
    assert out.stopped in ("no_gain", "max_rounds", "unchanged", "confident")


# ------------------------------------------------------------------------------------ the command
def test_dlm_edit_command(micro_run, tmp_path, capsys):
    import json

    import dlm
    from dlm.cli import main

    out = tmp_path / "edit.json"
    assert main(["edit", str(micro_run), "--text", TEXT, "--spans", "4:12", "--seed", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    want = dlm.load(micro_run).edit(TEXT, [(4, 12)], seed=2)
    assert got["text"] == want.text and got["nfe"] == want.nfe and got["mode"] == "rewrite"
    assert printed.startswith(want.text + "\n") and f"NFE {want.nfe}" in printed
    assert main(["edit", str(micro_run), "--text", TEXT, "--max-rounds", "2"]) == 0
    assert "[auto | " in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [(["--text", TEXT, "--spans", "4:99"], "outside the text"),
                                         (["--text", TEXT, "--spans", "4-9"], "START:END"),
                                         ([], "give --text"),
                                         (["--template", "a [MASK] b", "--spans", "1:2"], "--spans go with --text"),
                                         (["--text", TEXT, "--threshold", "2"], "threshold")])
def test_dlm_edit_user_errors_exit_2(micro_run, capsys, argv, words):
    from dlm.cli import main

    try:
        status = main(["edit", str(micro_run), *argv])
    except SystemExit as e:  # argparse's own refusals
        status = e.code
    assert status == 2
    assert words in capsys.readouterr().err


def test_uniform_state_model_renoises_and_restores(golden):
    """A uniform-state process (the plugin test package's, imported here and taken out of the registries after):
    scoring is one call on the text as it is, remasked tokens are fresh uniform draws (`process.prior`), its own
    renoising sampler regenerates them; with the oracle every corrupted token comes back."""
    import importlib.util
    import sys
    from pathlib import Path

    from dlm.build import describe_model
    from dlm.process import PROCESSES
    from dlm.sampler.registry import SAMPLERS

    path = Path(__file__).parent / "plugin_package" / "dlm_uniform_plugin.py"
    spec = importlib.util.spec_from_file_location("edit_uniform_plugin", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        base = golden["mdlm"]
        process = module.UniformX0(1e-3)
        process.description = describe_model(base.network.cfg, None)
        tok = base.tokenizer
        n = len(tok(TEXT, add_special_tokens=False)["input_ids"])
        corrupted = corrupt(tok, TEXT, [1, n - 2], seed=2)
        oracle = oracle_model(golden, TEXT)
        model = DiffusionLM(oracle.network, process, tok, base.cfg)
        draws = []
        original_prior = process.prior
        process.prior = lambda z, where, g=None: draws.append(where.clone()) or original_prior(z, where, g)
        out = model.edit(corrupted, seed=0, budget=0.2, steps=3)
        assert out.text == TEXT and out.changed_tokens == 2
        assert draws and int(draws[0].sum()) == 2  # the two corrupted tokens renoised, nothing else
        assert out.nfe == oracle.network.calls
        kept = model.edit(TEXT, [(4, 12)], steps=3)  # a span rewrite: the oracle writes the same words back
        assert kept.text == TEXT and kept.changes == [] and kept.rounds == 1
    finally:
        sys.modules.pop(spec.name, None)
        PROCESSES.pop("uniform_x0", None)
        SAMPLERS.pop("renoise", None)
