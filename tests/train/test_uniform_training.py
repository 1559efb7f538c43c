"""udlm (with self-conditioning) and gidd through `dlm train / eval / sample` and the Python API: a run stopped at
step 8 and resumed ends bit-identical to the uninterrupted one (the self-conditioning block included), `dlm eval`
reports the bound the API computes, and `dlm sample` gives the API's tokens with the process's default sampler and
feedback."""

import json

import pytest
import torch

import dlm
from dlm.cli import main
from tests.train.test_resume import assert_identical_runs

PROCESSES = {"udlm_sc": ["process=udlm", "process.self_conditioning=0.5"], "gidd": ["process=gidd"]}


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_train_resume_eval_and_sample(name, micro_args, text_folder, tmp_path, capsys):
    extra = PROCESSES[name]
    a, b = tmp_path / "A", tmp_path / "B"
    assert main(["train", *micro_args(a, *extra)]) == 0
    assert main(["train", *micro_args(b, *extra, "trainer.max_steps=8")]) == 0
    assert main(["train", *micro_args(b, *extra)]) == 0  # the same command as A: resumes from last.ckpt
    assert_identical_runs(a, b)
    model = dlm.load(a)
    assert model.process.name == extra[0].split("=")[1] and model.process.likelihood == "bound"
    if name == "udlm_sc":  # the block is a process parameter: trained (its down projection left zero) and exported
        assert float(model.process.self_conditioner.down.weight.detach().abs().sum()) > 0
        assert model.process.feedback() is not None

    out = tmp_path / "eval.json"
    args = ["--source", str(text_folder), "--split", "val", "--num-t-samples", "2", "--max-rows", "4", "--seed", "1"]
    assert main(["eval", str(a), *args, "--json", str(out)]) == 0
    row = json.loads(out.read_text())[0]
    want = model.perplexity(source=str(text_folder), split="val", num_t_samples=2, max_rows=4, seed=1)
    assert row["val_ppl"] == want["ppl"] and 1.0 < want["ppl"] < float("inf")

    samples = tmp_path / "s.jsonl"
    assert main(["sample", str(a), "--num-samples", "2", "--steps", "6", "--length", "20", "--seed", "4",
                 "--prompt", "And the king", "--out", str(samples)]) == 0
    assert "uniform_ancestral" in capsys.readouterr().out
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    api = model.generate(prompt="And the king", num_samples=2, steps=6, length=20, seed=4)
    assert [r["ids"] for r in rows] == api.tokens.tolist()
    prompt = [model.tokenizer.bos_token_id] + model.encode("And the king")
    assert all(r["ids"][:len(prompt)] == prompt for r in rows)
    assert not bool((api.tokens == model.tokenizer.mask_token_id).any())
    assert int(api.nfe) == 7  # 6 steps + the final argmax
    template = model.generate(template="The [MASK*4] of the [MASK*2].", seed=1, steps=4)
    canvas, fixed = model.build_canvas(0, template="The [MASK*4] of the [MASK*2].")
    assert torch.equal(template.tokens[0][fixed], canvas[fixed])
