"""Special ids (mask, pad, EOS, EoT, BOS) read from an open folder's config.json, generation_config.json and
tokenizer, checked against each other (dlm/network/families/special_ids.py); the families' constants only as a
logged last resort."""

import json
import logging

import pytest

import dlm
from dlm.network.families import CheckpointFormatError, load_pretrained_network
from tests.network.checkpoints import QWEN_VOCAB, llama_model, qwen_model, qwen_style_checkpoint

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>")  # ids 508..511 of a 512-token vocabulary


def small_tokenizer(folder, vocab: int = 512, specials=SPECIALS, **tokens):
    """A word-level tokenizer of `vocab` tokens whose last ones are Qwen-style added special tokens; `tokens` names
    its eos/pad/mask/bos tokens (tokenizer_config.json), as Dream's own tokenizer does with Qwen's names."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - len(specials))}
    tok = Tokenizer(WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    PreTrainedTokenizerFast(tokenizer_object=tok, **tokens).save_pretrained(str(folder))


def dream_folder(folder, **config):
    """A Dream-layout folder with a 512-token vocabulary and the small tokenizer (not Qwen's)."""
    qwen_style_checkpoint(folder, qwen_model(2, vocab=512), "Dream", ["DreamModel"], **config)
    small_tokenizer(folder, eos_token="<|endoftext|>", pad_token="<|endoftext|>", mask_token="<|mask|>")
    return folder


def test_a_dream_folder_with_its_own_tokenizer_loads_with_its_ids(tmp_path):
    """Before: refused with "eot_id=151645 is outside the vocabulary of 512 tokens" (Qwen's EoT was a constant)."""
    dream_folder(tmp_path, mask_token_id=511, eos_token_id=508, pad_token_id=508)
    _, desc = load_pretrained_network(tmp_path)
    assert (desc.mask_id, desc.pad_id, desc.eos_id, desc.eot_id, desc.bos_id) == (511, 508, 508, 510, None)
    model = dlm.load(tmp_path)  # the public door, tokenizer checked against the same ids
    assert (model.process.mask_id, model.tokenizer.mask_token_id, model.tokenizer.eos_token_id) == (511, 511, 508)


def test_ids_config_json_lacks_are_read_from_the_tokenizer(tmp_path):
    dream_folder(tmp_path)  # config.json names no special id at all
    _, desc = load_pretrained_network(tmp_path)
    assert (desc.mask_id, desc.pad_id, desc.eos_id, desc.eot_id) == (511, 508, 508, 510)


def test_the_familys_own_token_is_found_by_name_before_any_constant(tmp_path, caplog):
    """SDAR's users add `<|MASK|>` themselves: a tokenizer that holds the family's mask token without declaring it."""
    qwen_style_checkpoint(tmp_path, qwen_model(2, vocab=512), "Dream", ["DreamModel"], eos_token_id=508)
    small_tokenizer(tmp_path, eos_token="<|endoftext|>")  # no mask_token, no pad_token declared
    with caplog.at_level(logging.WARNING, logger="dlm.network.families.special_ids"):
        _, desc = load_pretrained_network(tmp_path)
    assert (desc.mask_id, desc.pad_id, desc.eos_id, desc.eot_id) == (511, 508, 508, 510) and caplog.text == ""


@pytest.mark.parametrize("key,value,theirs", [("mask_token_id", 500, 511), ("pad_token_id", 3, 508),
                                              ("eos_token_id", 7, 508)])
def test_config_and_tokenizer_disagreeing_is_an_error_naming_both(tmp_path, key, value, theirs):
    dream_folder(tmp_path, **{key: value})
    with pytest.raises(CheckpointFormatError, match=rf"config.json gives {key}={value} but tokenizer_config.json's "
                                                    rf"\w+ '<\|\w+\|>' is id {theirs}\. Fix the folder: set {key}"):
        load_pretrained_network(tmp_path)


def test_generation_config_is_a_source_and_is_checked(tmp_path):
    dream_folder(tmp_path, mask_token_id=511)
    (tmp_path / "generation_config.json").write_text(json.dumps({"pad_token_id": 508, "bos_token_id": 509}))
    _, desc = load_pretrained_network(tmp_path)
    assert (desc.pad_id, desc.bos_id) == (508, 509)
    (tmp_path / "generation_config.json").write_text(json.dumps({"mask_token_id": 4}))
    with pytest.raises(CheckpointFormatError, match=r"config.json gives mask_token_id=511 but generation_config.json's "
                                                    r"is id 4"):
        load_pretrained_network(tmp_path)


def test_an_instruct_tokenizer_may_name_its_end_of_turn_token_as_eos(tmp_path):
    """Llama 3 / Qwen2.5-Instruct: config.json's EOS is a list or end-of-text, the tokenizer's EOS the EoT token."""
    dream_folder(tmp_path, mask_token_id=511, eos_token_id=[508, 509])
    small_tokenizer(tmp_path, eos_token="<|im_end|>", mask_token="<|mask|>")
    _, desc = load_pretrained_network(tmp_path)
    assert (desc.eos_id, desc.eot_id) == (508, 510)
    assert dlm.load(tmp_path).tokenizer.eos_token_id == 510
    dream_folder(tmp_path, mask_token_id=511, eos_token_id=[508, 509])  # any of config.json's EOS ids agrees
    small_tokenizer(tmp_path, eos_token="<|im_start|>", mask_token="<|mask|>")
    assert load_pretrained_network(tmp_path)[1].eos_id == 508 and dlm.load(tmp_path).tokenizer.eos_token_id == 509
    dream_folder(tmp_path, mask_token_id=511, eos_token_id=[507, 508])
    small_tokenizer(tmp_path, eos_token="<|im_start|>", mask_token="<|mask|>")
    with pytest.raises(CheckpointFormatError, match=r"eos_token_id=507 .* '<\|im_start\|>' is id 509"):
        load_pretrained_network(tmp_path)


def test_constants_are_the_logged_last_resort(tmp_path, caplog):
    """No tokenizer, no ids in config.json: Qwen's ids (they fit this vocabulary), each logged; a constant outside the
    vocabulary is never used."""
    qwen_style_checkpoint(tmp_path, qwen_model(2), "Dream", ["DreamModel"])
    with caplog.at_level(logging.WARNING, logger="dlm.network.families.special_ids"):
        _, desc = load_pretrained_network(tmp_path)
    assert (desc.mask_id, desc.pad_id, desc.eos_id, desc.eot_id) == (151666, 151643, 151643, 151645)
    assert ("no file names the mask_id; using the dream family's constant 151666 (a documented last resort: add "
            "mask_token_id to config.json" in caplog.text)
    assert "the eot_id; using the dream family's constant 151645" in caplog.text and QWEN_VOCAB > 151666
    small = tmp_path / "small"
    qwen_style_checkpoint(small, qwen_model(2, vocab=512), "Dream", ["DreamModel"])
    with pytest.raises(CheckpointFormatError, match="a dream model with absorbing corruption needs a mask id"):
        load_pretrained_network(small)


def test_causal_lms_read_their_ids_from_the_tokenizer_too(tmp_path):
    model = llama_model(vocab=512)
    qwen_style_checkpoint(tmp_path, model, "llama", ["LlamaForCausalLM"], bos_token_id=509, eos_token_id=508)
    small_tokenizer(tmp_path, specials=("<|endoftext|>", "<|begin|>", "<|eot_id|>", "<pad>"), eos_token="<|endoftext|>",
                    bos_token="<|begin|>", pad_token="<pad>")
    _, desc = load_pretrained_network(tmp_path)
    assert (desc.bos_id, desc.eos_id, desc.eot_id, desc.pad_id) == (509, 508, 510, 511)
    small_tokenizer(tmp_path, specials=("<|endoftext|>", "<|begin|>", "<|eot_id|>", "<pad>"), eos_token="<|endoftext|>",
                    bos_token="<pad>")
    with pytest.raises(CheckpointFormatError, match="bos_token_id=509 but tokenizer_config.json's bos_token '<pad>' "
                                                    "is id 511"):
        load_pretrained_network(tmp_path)
