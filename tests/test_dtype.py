"""The weights' dtype chosen at load: `dlm.load(path, dtype=...)` (float32 / bfloat16 / float16 / auto = as stored),
`--dtype` on `dlm sample` and `dlm eval`, and the dtype recorded in `Generation`."""

import json

import pytest
import torch

import dlm
from dlm.cli import main
from dlm.network.families import load_pretrained_network
from dlm.precision import use_bf16
from tests.network.checkpoints import LLADA_VOCAB, llada_checkpoint
from tests.test_open_models import word_tokenizer


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    """A LLaDA folder stored in bf16, with a tokenizer."""
    folder = tmp_path_factory.mktemp("llada_bf16")
    llada_checkpoint(folder, shards=1, dtype=torch.bfloat16)
    word_tokenizer(folder, LLADA_VOCAB, 126336, 126081)
    return folder


def dtypes(model) -> set:
    return {p.dtype for p in model.network.parameters()}


def test_open_folder_as_stored_or_converted(bf16_folder):
    stored = dlm.load(bf16_folder)
    assert dtypes(stored) == {torch.bfloat16} and dlm.load(bf16_folder, dtype="auto").weight_dtype == "bfloat16"
    gen = stored.generate(["w5 w6"], gen_length=4, sampler="llada", steps=4)
    assert gen.dtype == "bfloat16" and gen.bf16_autocast == use_bf16("auto", "cpu")  # AMX / AVX512-BF16 CPUs: on
    assert stored.generate(["w5"], gen_length=2, sampler="llada", steps=2, precision="32").bf16_autocast is False
    as32 = dlm.load(bf16_folder, dtype="float32")
    assert dtypes(as32) == {torch.float32}
    assert as32.generate(["w5 w6"], gen_length=4, sampler="llada", steps=4).dtype == "float32"
    net32, _ = load_pretrained_network(bf16_folder, dtype=torch.float32)  # the same conversion as the loader's
    x = torch.tensor([[5, 6, 126336, 126336]])
    with torch.no_grad():
        assert torch.equal(as32.network(x), net32(x))
    assert dtypes(dlm.load(bf16_folder, dtype=torch.float16)) == {torch.float16}


@pytest.mark.parametrize("bad", ["fp8", "bf16", "int8", torch.int8, 32])
def test_a_bad_dtype_is_refused_naming_the_valid_ones(bf16_folder, bad):
    with pytest.raises(ValueError, match=r"dtype=.* is not a weight dtype; valid: auto \(as stored\), float32, "
                                         r"bfloat16, float16"):
        dlm.load(bf16_folder, dtype=bad)


def test_a_dlm_run_converted_at_load(micro_run):
    assert dtypes(dlm.load(micro_run)) == {torch.float32}
    model = dlm.load(micro_run, dtype="bfloat16")
    assert dtypes(model) == {torch.bfloat16}
    gen = model.generate(num_samples=2, length=12, steps=4, seed=0)
    assert gen.dtype == "bfloat16" and gen.tokens.shape == (2, 12)


def test_learned_process_weights_follow_the_dtype(tmp_path):
    """A self-conditioned model's projection is converted with the network (else bf16 hidden states would meet a
    float32 projection)."""
    from tests.process.test_self_conditioning import model

    model(scale=0.5).save_pretrained(tmp_path)
    loaded = dlm.load(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in loaded.process.parameters()} == {torch.bfloat16} == dtypes(loaded)
    gen = loaded.generate(num_samples=2, length=24, prompt="And the king", steps=4, seed=3)
    assert gen.dtype == "bfloat16" and gen.tokens.shape == (2, 24)


def test_sample_takes_dtype(bf16_folder, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    args = ["sample", str(bf16_folder), "--sampler", "llada", "--prompt", "w5 w6", "--gen-length", "4", "--steps", "4"]
    assert main([*args, "--dtype", "float32", "--out", str(out)]) == 0
    assert len(json.loads(out.read_text().splitlines()[0])["ids"]) == 4
    with pytest.raises(SystemExit) as e:
        main([*args, "--dtype", "fp8"])
    assert e.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def test_eval_takes_dtype(micro_run, text_folder, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["--source", str(text_folder), "--split", "val", "--num-t-samples", "1", "--max-rows", "2"]
    assert main(["eval", str(micro_run), *args, "--dtype", "bfloat16", "--json", str(out)]) == 0
    row = json.loads(out.read_text())[0]
    assert row["dtype"] == "bfloat16" and row["val_num_tokens"] == 2 * 31
    assert "dtype" in capsys.readouterr().out.splitlines()[0]
    assert main(["eval", str(micro_run), *args, "--json", str(out)]) == 0
    assert "dtype" not in json.loads(out.read_text())[0]  # as stored: the table is unchanged
