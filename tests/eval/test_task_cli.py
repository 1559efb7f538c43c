"""`dlm eval RUN --task sudoku`, `dlm sample RUN --task sudoku` and `evaluate_model` on a micro Sudoku model: an
untrained 1-layer network with the task's tokenizer, saved as a run folder whose training data is a 4x4 task folder
(the plumbing, not the quality: the metric functions are tested in tests/tasks)."""

import json

import pytest
import torch

import dlm
from dlm.cli import main
from dlm.config import ModelConfig, RunConfig
from dlm.eval.tasks import evaluate_model, task_examples
from dlm.network import Transformer
from dlm.pipeline import DiffusionLM
from dlm.process import MaskedDiffusion
from dlm.process.schedules import LogLinearSchedule
from dlm.tasks import make_task


@pytest.fixture(scope="module")
def sudoku_run(tmp_path_factory):
    """A run folder (run/model) of a random 4x4 Sudoku model; its config's data.source is a task folder with 8
    test puzzles (seed 0)."""
    d = tmp_path_factory.mktemp("sudoku")
    task = make_task("sudoku", size=4)
    task.write_pairs(d / "data", {"train": 20, "test": 8}, seed=0)
    tok = task.tokenizer()
    torch.manual_seed(0)
    mc = ModelConfig(n_layer=1, n_head=2, d_model=32, context=40, cond_dim=16, vocab_size=len(tok),
                     time_conditioning=False)
    cfg = RunConfig(model=mc)
    cfg.data.source = str(d / "data")
    net = Transformer(mc)
    with torch.no_grad():  # far from uniform predictions, as tests/conftest.py's tiny_network
        for name, p in net.named_parameters():
            if p.ndim >= 2 and "adaln" not in name:
                p.normal_(0.0, 0.3)
    model = DiffusionLM(net, MaskedDiffusion(LogLinearSchedule(1e-3), tok.mask_token_id), tok, cfg)
    model.save_pretrained(d / "run" / "model")
    return d / "run"


def test_eval_task_from_the_runs_task_folder(sudoku_run, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", str(sudoku_run), "--task", "sudoku", "--sampler", "llada", "-o", "remasking=margin",
                 "--json", str(out), "--progress", "off"]) == 0
    text = capsys.readouterr().out
    for head in ("solved %", "cell accuracy %", "blank accuracy %", "violations", "NFE/example", "tok/s"):
        assert head in text
    assert "test.jsonl" in text and "llada steps=17 remasking=margin" in text
    (row,) = json.loads(out.read_text())
    assert row["n"] == 8 and row["nfe"] == 17.0 and row["generated_positions"] == 17  # one position per call
    assert row["task_options"] == {"size": 4, "givens": 6} and len(row["solved_per_example"]) == 8
    assert 0 <= row["solved"] <= 1 and 0 <= row["cell_accuracy"] <= 1 and row["tokens_per_second"] > 0


@pytest.mark.parametrize("options,nfe", [(["-o", "steps=4"], 4.0), (["-o", "threshold=0.9", "-o", "remasking=entropy"],
                                                                       None), (["-o", "remasking=random"], 17.0)])
def test_eval_task_sampler_options(sudoku_run, tmp_path, options, nfe):
    out = tmp_path / "r.json"
    assert main(["eval", str(sudoku_run), "--task", "sudoku", "--sampler", "llada", "--limit", "3", *options,
                 "--json", str(out), "--progress", "off"]) == 0
    (row,) = json.loads(out.read_text())
    assert row["n"] == 3 and (nfe is None or row["nfe"] == nfe) and 1 <= row["nfe"] <= 17


def test_generated_examples_are_the_task_folders_own(sudoku_run):
    """Generated with the folder's options and seed, the test split is the folder's (a prefix of it for fewer)."""
    model = dlm.load(sudoku_run)
    task, from_folder, source = task_examples("sudoku", model)
    assert source.endswith("test.jsonl") and len(from_folder) == 8
    _, generated, source = task_examples("sudoku", model, data="generate", limit=5)
    assert "generated" in source and "seed 0" in source and "size=4" in source
    assert generated == from_folder[:5]  # puzzles, solutions, givens and the solver's branchings
    _, other, source = task_examples("sudoku", model, seed=3, limit=5)
    assert "seed 3" in source and other != generated
    with pytest.raises(ValueError, match="--task-option and --task-seed set generated examples"):
        task_examples("sudoku", model, data=str(model.cfg.data.source), options={"size": 6})


def test_answers_do_not_depend_on_the_batch(sudoku_run):
    model = dlm.load(sudoku_run)
    task, examples, _ = task_examples("sudoku", model)
    kw = dict(sampler="ancestral", steps=6, temperature=1.0, seed=5)
    a = evaluate_model(model, task, examples, batch_size=8, **kw)
    b = evaluate_model(model, task, examples, batch_size=3, **kw)
    c = evaluate_model(model, task, examples, batch_size=8, **{**kw, "seed": 6})
    assert a["responses"] == b["responses"] and a["responses"] != c["responses"]
    assert a["scores"] == b["scores"] and a["n"] == 8 and a["nfe"] == b["nfe"]


def test_a_model_that_is_too_small_or_not_the_tasks(sudoku_run, micro_run, capsys):
    assert main(["eval", str(micro_run), "--task", "sudoku", "--progress", "off"]) == 2
    err = capsys.readouterr().err
    assert "is not the sudoku task's (15 tokens" in err and "data.format=pairs" in err
    assert main(["eval", str(sudoku_run), "--task", "sudoku", "--task-data", "generate", "--task-option", "size=6",
                 "--limit", "1", "--progress", "off"]) == 2
    assert "needs 74 positions" in capsys.readouterr().err  # 1 + 36 + 36 + 1 > the context of 40
    assert main(["eval", str(sudoku_run), "--task", "sudoku", "--gen-ppl"]) == 2
    assert "--gen-ppl measure text models" in capsys.readouterr().err
    assert main(["eval", str(sudoku_run), "--limit", "3"]) == 2
    assert "go with --task NAME" in capsys.readouterr().err


def test_sample_task_shows_the_board(sudoku_run, tmp_path, capsys):
    puzzle = make_task("sudoku", size=4).generate("test", 1, seed=0)[0]
    out = tmp_path / "s.jsonl"
    assert main(["sample", str(sudoku_run), "--task", "sudoku", "--prompt", puzzle["puzzle"], "--sampler", "llada",
                 "--remasking", "margin", "--out", str(out), "--progress", "off"]) == 0
    text = capsys.readouterr().out
    assert "puzzle       answer" in text and "solved" in text and "llada, 17 steps" in text
    assert "NFE per example 17.0" in text
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["prompt"] == puzzle["puzzle"] and len(line["response"]) <= 17 and "solved" in line
    assert main(["sample", str(sudoku_run), "--task", "sudoku", "--num-samples", "2", "--progress", "off"]) == 0
    assert capsys.readouterr().out.count("--- sudoku") == 2
    assert main(["sample", str(sudoku_run), "--task", "sudoku", "--prompt", "1111" + "." * 12]) == 2
    assert "has no solution" in capsys.readouterr().err
