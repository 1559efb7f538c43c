"""The `dlm` command end to end: train (the `micro_run` fixture runs `dlm train` in-process), sample, eval,
export, presets, --print-config; bad input exits with code 2 and one clear line on stderr."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import dlm
from dlm.cli import main

REPO = Path(__file__).resolve().parents[1]
SAMPLE = ["--num-samples", "2", "--steps", "6", "--length", "20", "--seed", "4", "--top-p", "0.9"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_writes_a_complete_run_folder(micro_run):
    for name in ("config.yaml", "loss_curve.png", "checkpoints/last.ckpt", "model/config.json",
                 "model/model.safetensors", "model/tokenizer.json", "tokenizer/tokenizer.json"):
        assert (micro_run / name).is_file(), name
    saved = yaml.safe_load((micro_run / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 12 and saved["model"]["vocab_size"] == 300


def test_sample_unconditional_matches_the_api(micro_run, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert main(["sample", str(micro_run), *SAMPLE, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "--- sample 0 ---" in stdout and "--- sample 1 ---" in stdout and "NFE" in stdout
    rows = read_jsonl(out)
    api = dlm.load(micro_run).generate(num_samples=2, steps=6, length=20, seed=4, top_p=0.9,
                                       sampler="ancestral_cache")
    assert [r["ids"] for r in rows] == api.tokens.tolist()
    assert [r["text"] for r in rows] == api.texts


def test_sample_with_prompt_and_template(micro_run, tmp_path, capsys):
    model = dlm.load(micro_run)
    out = tmp_path / "p.jsonl"
    assert main(["sample", str(micro_run), *SAMPLE, "--prompt", "And the king", "--out", str(out)]) == 0
    prompt_ids = [model.tokenizer.bos_token_id] + model.encode("And the king")
    for row in read_jsonl(out):
        assert row["ids"][: len(prompt_ids)] == prompt_ids and len(row["ids"]) == 20
        assert row["text"].startswith("And the king")
    template = "The [MASK*4] of the [MASK*2]."
    canvas, fixed = model.build_canvas(0, template=template)
    assert main(["sample", str(micro_run), *SAMPLE, "--template", template, "--out", str(out)]) == 0
    for row in read_jsonl(out):
        ids = torch.tensor(row["ids"])
        assert ids.shape == canvas.shape and torch.equal(ids[fixed], canvas[fixed])
        assert not bool((ids == model.tokenizer.mask_token_id).any())
    capsys.readouterr()


def test_eval_perplexity_matches_the_api(micro_run, text_folder, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["--source", str(text_folder), "--split", "val", "--num-t-samples", "2", "--max-rows", "8", "--seed", "1"]
    assert main(["eval", str(micro_run), *args, "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "val ppl" in stdout and "2 time samples" in stdout
    row = json.loads(out.read_text())[0]
    want = dlm.load(micro_run).perplexity(source=str(text_folder), split="val", num_t_samples=2, max_rows=8, seed=1)
    assert row["val_ppl"] == want["ppl"] and row["val_num_tokens"] == want["num_tokens"] == 8 * 31
    assert "gen_ppl" not in row
    # The steps the weights were trained for, from the export (and from a checkpoint): a budget-stopped run shows it.
    assert row["steps"] == 12 and "steps" in stdout.splitlines()[0]
    assert dlm.load(micro_run / "checkpoints" / "last.ckpt").trained_steps == 12


def test_export_then_load_generates_the_same(micro_run, tmp_path, capsys):
    folder = tmp_path / "exported"
    assert main(["export", str(micro_run / "checkpoints" / "last.ckpt"), str(folder)]) == 0
    assert "exported to" in capsys.readouterr().out
    a = dlm.load(folder).generate(num_samples=2, length=16, steps=5, seed=2)
    b = dlm.load(micro_run).generate(num_samples=2, length=16, steps=5, seed=2)
    assert torch.equal(a.tokens, b.tokens)
    live = tmp_path / "live"
    assert main(["export", str(micro_run / "checkpoints" / "last.ckpt"), str(live), "--live-weights"]) == 0
    assert not torch.equal(dlm.load(live).network.head.weight, dlm.load(folder).network.head.weight)


def test_presets_and_print_config(tmp_path, capsys):
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "model=tiny" in listing and "process=ar" in listing and "model:" in listing
    from dlm.process import PROCESSES
    from dlm.sampler import SAMPLERS

    assert all(f"\n  {name} " in listing for name in [*PROCESSES, *SAMPLERS])  # read from the registries
    out_dir = tmp_path / "never"
    assert main(["train", "--print-config", "model=tiny", "trainer.max_steps=77", f"trainer.out_dir={out_dir}"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["max_steps"] == 77 and cfg["model"]["n_layer"] == 4 and cfg["model"]["d_model"] == 256
    assert not out_dir.exists()  # printing the config trains nothing


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, micro_run):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("  \n")
    data = (micro_run / "checkpoints" / "last.ckpt").read_bytes()
    (d / "corrupt.ckpt").write_bytes(data[: len(data) // 3])
    return d


BAD = [
    (["train", "trainer.max_step=3"], "unknown config key 'trainer.max_step'"),
    (["train", "model=huge"], "unknown model preset 'huge'; valid presets:"),
    (["train", "trainer.max_steps=0"], "trainer.max_steps=0 must be a positive integer"),
    (["train", "trainer.max_steps=-5"], "trainer.max_steps=-5 must be a positive integer"),
    (["train", "trainer.max_minutes=-1"], "trainer.max_minutes=-1"),
    (["train", "{micro}", "data.source={bad}/no/such/folder/"], "no such file or folder"),
    (["train", "{micro}", "data.source={bad}/empty.txt"], "no text found"),
    (["sample", "{run}", "--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
    (["sample", "{run}", "--top-p", "1.5"], "top_p=1.5 must be in (0, 1]"),
    (["sample", "{run}", "--steps", "0"], "steps=0 must be a positive integer"),
    (["sample", "{run}", "--temperature", "-1"], "temperature=-1.0 must be >= 0"),
    (["sample", "{bad}/corrupt.ckpt"], "is truncated or corrupt"),
    (["eval", "{bad}/corrupt.ckpt", "--max-rows", "2"], "is truncated or corrupt"),
    (["export", "{bad}/missing.ckpt", "{bad}/out"], "no model at"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_bad_input_exits_2_with_a_message(argv, message, micro_run, micro_args, bad_files, tmp_path, capsys):
    expanded = []
    for a in argv:
        if a == "{micro}":
            expanded += micro_args(tmp_path / "run")
        else:
            expanded.append(a.format(run=micro_run, bad=bad_files))
    assert main(expanded) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dlm {argv[0]}: error: ") and message in err, err
    assert "Traceback" not in err


def test_python_m_dlm_cli_in_a_subprocess(micro_run, tmp_path):
    out = tmp_path / "s.jsonl"
    ok = subprocess.run([sys.executable, "-m", "dlm.cli", "sample", str(micro_run), *SAMPLE, "--out", str(out)],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "--- sample 1 ---" in ok.stdout
    api = dlm.load(micro_run).generate(num_samples=2, steps=6, length=20, seed=4, top_p=0.9)
    assert [r["ids"] for r in read_jsonl(out)] == api.tokens.tolist()  # same tokens in a fresh process
    bad = subprocess.run([sys.executable, "-m", "dlm.cli", "sample", str(micro_run), "--top-p", "1.5"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "top_p=1.5 must be in (0, 1]" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorboard") is not None
                    or __import__("importlib").util.find_spec("tensorboardX") is not None,
                    reason="tensorboard is installed here")
def test_a_logger_whose_package_is_missing_is_a_clear_error(micro_args, tmp_path, capsys):
    assert main(["train", *micro_args(tmp_path / "tb", "trainer.logger=tensorboard")]) == 2
    err = capsys.readouterr().err
    assert "trainer.logger=tensorboard needs the 'tensorboard' package" in err and "Traceback" not in err


def test_abbreviated_options_are_refused(micro_run, capsys):
    """Only the options --help lists are accepted (argparse would otherwise take --num for --num-samples)."""
    with pytest.raises(SystemExit) as exit_:
        main(["sample", str(micro_run), "--num", "1"])
    assert exit_.value.code == 2 and "unrecognized arguments: --num" in capsys.readouterr().err


def test_sample_gen_length_counts_the_tokens_after_the_prompt(micro_run, tmp_path, capsys):
    """--gen-length works for every sampler (not only llada): that many tokens after each prompt; with --length
    as well it is refused (before, a non-llada sampler ignored it and generated the whole context)."""
    model = dlm.load(micro_run)
    out = tmp_path / "g.jsonl"
    prompt_ids = [model.tokenizer.bos_token_id] + model.encode("And the king")
    args = ["sample", str(micro_run), "--num-samples", "2", "--steps", "6", "--seed", "4", "--prompt", "And the king"]
    assert main([*args, "--gen-length", "7", "--out", str(out)]) == 0
    for row in read_jsonl(out):
        assert row["ids"][: len(prompt_ids)] == prompt_ids and len(row["ids"]) == len(prompt_ids) + 7
    capsys.readouterr()
    assert main([*args, "--gen-length", "7", "--length", "20"]) == 2
    assert "give --length (tokens per sample) or --gen-length" in capsys.readouterr().err


def test_sample_defaults_to_the_process_sampler_and_takes_sampler_options(micro_run, tmp_path, capsys):
    """No --sampler: the process's default_sampler; -o key=value sets any option of its config, typed by it."""
    out = tmp_path / "o.jsonl"
    args = ["--num-samples", "2", "--length", "20", "--seed", "4"]
    assert main(["sample", str(micro_run), *args, "-o", "steps=6", "--option", "top_p=0.9", "-o", "cache=false",
                 "--out", str(out)]) == 0
    model = dlm.load(micro_run)
    assert f"| {model.process.default_sampler}, 6 steps |" in capsys.readouterr().out
    api = model.generate(num_samples=2, length=20, seed=4, sampler=model.process.default_sampler, steps=6, top_p=0.9,
                         cache=False)
    assert [r["ids"] for r in read_jsonl(out)] == api.tokens.tolist()
    for bad, message in ((["-o", "eta=0.1"], "sampler 'ancestral_cache' has no option 'eta'; its options: steps, "
                                                "temperature, top_p, cache"),
                         (["-o", "steps=six"], "option steps of sampler 'ancestral_cache' is an int, not 'six'"),
                         (["--steps", "4", "-o", "steps=6"], "steps given twice"),
                         (["--sampler", "first_hitting", "--steps", "4"], "sampler 'first_hitting' does not take steps")):
        assert main(["sample", str(micro_run), *args, *bad]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["sample", str(micro_run), "--sampler", "nope"])
    assert e.value.code == 2 and "unknown sampler 'nope'; valid: ancestral" in capsys.readouterr().err


def test_sample_summary_tells_the_renoise_steps_of_a_diffusion_gemma_folder(tmp_path, capsys):
    """On a DiffusionGemma folder `dlm sample` runs renoise on each canvas inside the blockwise sampler: its summary
    names renoise's own step count per block (not the blockwise budget, which renoise does not read), and the
    calls it reports match it; --steps / -o steps= are refused (renoise would ignore them)."""
    pytest.importorskip("transformers.models.diffusion_gemma")
    from tests.network.dgemma_checkpoint import dgemma_checkpoint

    folder = dgemma_checkpoint(tmp_path / "dgemma", seed=1, scale=0.05, embed_scale=1.0)[0]
    args = ["sample", str(folder), "--prompt", "w5 w9", "--gen-length", "16", "--num-samples", "1", "--seed", "0",
            "--progress", "off"]
    assert main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "| blockwise (renoise, at most 48 steps per block, adaptive stop, KV cache)" in line, line
    assert int(line.split("| NFE ")[1].split()[0]) <= 2 * 48 + 2  # two blocks of 8, their steps and 2 encoder calls
    assert main([*args, "-o", "max_denoising_steps=6", "-o", "stability_threshold=None"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "| blockwise (renoise, 6 steps per block, KV cache)" in line, line
    assert "| NFE 14 |" in line  # exactly 6 steps in each of the 2 blocks, and 2 encoder calls (prompt, block 1)
    for bad in (["--steps", "5"], ["-o", "steps=5"]):
        assert main([*args, *bad]) == 2
        assert "renoise has no step budget" in capsys.readouterr().err


def test_sample_a_dream_folder_with_dreams_sampler(tmp_path, capsys):
    """A Dream-layout folder samples with `dream` by default; its options go by -o, and --block-length, --threshold
    and --cache set Fast-dLLM's Dream variant (the same tokens as the Python call)."""
    from tests.test_open_families_samplers import write_family

    write_family(tmp_path, "dream")
    base = ["sample", str(tmp_path), "--prompt", "w5 w6 w7", "--gen-length", "8", "--steps", "8", "--seed", "1",
            "--num-samples", "1"]
    out = tmp_path / "o.jsonl"
    assert main([*base, "-o", "alg=entropy", "-o", "top_k=3", "--temperature", "0.5", "--out", str(out)]) == 0
    assert "| dream, 8 steps |" in capsys.readouterr().out
    model = dlm.load(tmp_path)
    api = model.generate(["w5 w6 w7"], gen_length=8, steps=8, seed=1, alg="entropy", top_k=3, temperature=0.5)
    assert [r["ids"] for r in read_jsonl(out)] == api.tokens.tolist()
    assert main([*base, "--block-length", "4", "--cache", "dual", "-o", "alg=confidence_threshold", "--threshold",
                 "0.5", "--out", str(out)]) == 0
    api = model.generate(["w5 w6 w7"], gen_length=8, steps=8, seed=1, block_length=4, cache="dual",
                         alg="confidence_threshold", threshold=0.5)
    assert [r["ids"] for r in read_jsonl(out)] == api.tokens.tolist()
    assert main([*base, "-o", "alg=low_confidence"]) == 2
    assert "alg='low_confidence' is unknown; valid: origin" in capsys.readouterr().err
