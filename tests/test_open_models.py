"""Open checkpoints through the generation door: `dlm.load(folder)` of a downloaded LLaDA / Dream / causal-LM folder
gives a DiffusionLM with the family's process and tokenizer, and every sampler the process supports runs on it."""

import json

import pytest
import torch

import dlm
from dlm.cli import main
from dlm.network.families import is_open_checkpoint
from tests.network.checkpoints import LLADA_VOCAB, llada_checkpoint


def word_tokenizer(folder, vocab: int, mask_id: int, eos_id: int):
    """A word-level tokenizer covering the whole vocabulary, with the family's [MASK] and EOS ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    tok = Tokenizer(WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, mask_token=f"w{mask_id}", eos_token=f"w{eos_id}",
                            pad_token=f"w{eos_id}").save_pretrained(str(folder))


@pytest.fixture(scope="module")
def llada_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llada")
    torch.manual_seed(0)
    llada_checkpoint(folder)
    word_tokenizer(folder, LLADA_VOCAB, 126336, 126081)
    return folder


def test_an_open_llada_folder_loads_as_a_masked_diffusion_model(llada_folder):
    assert is_open_checkpoint(llada_folder)
    model = dlm.load(llada_folder)
    assert model.process.name == "mdlm" and model.process.mask_id == 126336 and not model.is_autoregressive
    for sampler, options in (("ancestral_cache", {}), ("first_hitting", {}), ("remdm_cap", {}),
                             ("llada", {"cache": "dual", "block_length": 4}),
                             ("llada", {"threshold": 0.5, "block_length": 4})):
        steps = {} if sampler == "first_hitting" else {"steps": 8}  # first_hitting has no step budget
        gen = model.generate(["w5 w6 w7", "w9"], gen_length=8, sampler=sampler, seed=0, **steps, **options)
        assert gen.generated_tokens == 16 and not bool((gen.tokens[gen.generated] == 126336).any())
    cached = model.generate(["w5 w6 w7"], gen_length=8, sampler="llada", steps=8, block_length=4, cache="none")
    assert cached.nfe == 8


def test_dlm_sample_takes_an_open_folder(llada_folder, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert main(["sample", str(llada_folder), "--sampler", "llada", "--prompt", "w5 w6", "--gen-length", "4",
                 "--block-length", "4", "--steps", "4", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and len(rows[0]["ids"]) == 4
    assert "NFE" in capsys.readouterr().out
