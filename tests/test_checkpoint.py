"""Checkpoints: every way to load a model gives the same model; damaged or foreign files fail with a clear error."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import dlm
from dlm.checkpoint import FORMAT_VERSION, READABLE_VERSIONS, CheckpointError, read_checkpoint
from dlm.data import train_bpe

PACKAGE = Path(dlm.__file__).parent
GEN = dict(num_samples=3, length=24, steps=8, seed=1, top_p=0.9, temperature=0.9)


def test_run_folder_export_and_ckpt_give_identical_generations(micro_run, tmp_path):
    from_run = dlm.load(micro_run)  # -> micro_run/model
    from_ckpt = dlm.load(micro_run / "checkpoints" / "last.ckpt")  # EMA weights of the training checkpoint
    exported = dlm.load(from_ckpt.save_pretrained(tmp_path / "exported"))
    reference = from_run.generate(**GEN)
    assert not bool((reference.tokens == from_run.tokenizer.mask_token_id).any())
    for other in (from_ckpt, exported):
        state = other.network.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in from_run.network.state_dict().items())
        out = other.generate(**GEN)
        assert torch.equal(out.tokens, reference.tokens) and out.texts == reference.texts
    # Control: the live (non-EMA) weights are a different model.
    live = dlm.load(micro_run / "checkpoints" / "last.ckpt", use_ema=False)
    assert not torch.equal(live.network.head.weight, from_run.network.head.weight)


def test_truncated_training_checkpoint(micro_run, tmp_path):
    data = (micro_run / "checkpoints" / "last.ckpt").read_bytes()
    bad = tmp_path / "half.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"half\.ckpt is truncated or corrupt.*use another checkpoint"):
        dlm.load(bad)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(empty)
    with pytest.raises(CheckpointError, match="no model at"):
        dlm.load(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("damage", ["truncate", "header", "empty"])
def test_corrupt_safetensors(micro_run, tmp_path, damage):
    folder = shutil.copytree(micro_run / "model", tmp_path / "model")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "header":
        weights.write_bytes(b"\xff" * 16 + data[16:])  # the header length and the start of the JSON header
    else:
        weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt.*re-export"):
        dlm.load(folder)


def test_a_flipped_byte_is_detected_in_checkpoints_and_exports(micro_run, tmp_path):
    """torch.load and safetensors load a file with a damaged tensor byte without complaint; dlm checks the zip
    archive's CRC-32s (checkpoints) and the SHA-256 recorded at export (model folders)."""
    data = bytearray((micro_run / "checkpoints" / "last.ckpt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor records, far from the archive's directory
    flipped = tmp_path / "flipped.ckpt"
    flipped.write_bytes(bytes(data))
    torch.load(flipped, map_location="cpu", weights_only=True)  # what would have happened: it loads
    with pytest.raises(CheckpointError, match=r"flipped\.ckpt is corrupt: .* fails its CRC check"):
        read_checkpoint(flipped)
    folder = shutil.copytree(micro_run / "model", tmp_path / "model")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # a byte of the last tensor's data
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt.*SHA-256 differs"):
        dlm.load(folder)


def test_missing_weights_file_and_corrupt_config(micro_run, tmp_path):
    folder = shutil.copytree(micro_run / "model", tmp_path / "model")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        dlm.load(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        dlm.load(folder)


@pytest.mark.parametrize("version, hint", [(FORMAT_VERSION + 1, "upgrade dlm"), (min(READABLE_VERSIONS) - 1, "older")])
def test_incompatible_format_version(micro_run, tmp_path, version, hint):
    ckpt = torch.load(micro_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["dlm"]["format_version"] = version
    path = tmp_path / "other.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=f"uses checkpoint format {version}, this dlm reads format"
                                              f".*{hint}"):
        dlm.load(path)
    folder = shutil.copytree(micro_run / "model", tmp_path / "model")
    meta = json.loads((folder / "config.json").read_text())
    meta["dlm_format_version"] = version
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"format {version}.*{hint}"):
        dlm.load(folder)


def test_a_file_without_dlm_metadata_is_refused(micro_run, tmp_path):
    ckpt = torch.load(micro_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["dlm"]
    torch.save(ckpt, tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match="not a dlm checkpoint"):
        dlm.load(tmp_path / "plain.ckpt")


def test_weights_that_do_not_fit_the_config(micro_run, tmp_path):
    folder = shutil.copytree(micro_run / "model", tmp_path / "model")
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["model"]["n_layer"] = 3
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config\.json is corrupt or was changed after it was written"):
        dlm.load(folder)
    from dlm.integrity import write_record  # an edit that also rewrites the record: the weights still must fit

    write_record(folder, [p.name for p in folder.iterdir() if p.name != "integrity.json"])
    with pytest.raises(CheckpointError, match="do not fit the network"):
        dlm.load(folder)


def test_a_foreign_tokenizer_is_refused(micro_run, text_folder):
    texts = ["An entirely different text, about ships and harbours. " * 40]
    with pytest.raises(CheckpointError, match="tokenizer"):
        dlm.load(micro_run, tokenizer=train_bpe(texts, vocab_size=300))  # same size, different vocabulary
    with pytest.raises(CheckpointError, match="tokenizer"):
        dlm.load(micro_run, tokenizer=train_bpe(texts, vocab_size=400))  # larger than the model's vocabulary
    own = dlm.load(micro_run)
    assert dlm.load(micro_run, tokenizer=own.tokenizer).tokenizer is own.tokenizer  # control: its own is accepted


def torch_load_calls(source: str) -> list[str]:
    """The text of every `torch.load(...)` call in `source`, parentheses matched."""
    calls = []
    for m in re.finditer(r"torch\.load\(", source):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        calls.append(source[m.start():i])
    return calls


def test_torch_load_is_always_weights_only():
    files = sorted(PACKAGE.rglob("*.py"))
    calls = {f: torch_load_calls(f.read_text()) for f in files}
    assert sum(len(c) for c in calls.values()) >= 1  # the check looks at something
    for f, found in calls.items():
        for call in found:
            assert re.search(r"weights_only\s*=\s*True", call), f"{f.relative_to(PACKAGE)}: {call}"
    assert torch_load_calls("x = torch.load(p, map_location=f(a, b))") == ["torch.load(p, map_location=f(a, b))"]


def test_checkpoint_tokenizer_keeps_an_unknown_token_outside_the_model(tmp_path):
    """A Hugging Face tokenizer whose unk_token is not its model's (SmolLM2's <|endoftext|>, adopted by an adapted
    run) round-trips through a checkpoint's tokenizer state with the same fingerprint, and states written before
    unk_token was stored still load (the special token that reproduces the fingerprint is found)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    from dlm.checkpoint import tokenizer_from_state, tokenizer_state
    from dlm.data.tokenizer import tokenizer_fingerprint
    from dlm.integrity import model_tokenizer

    backend = Tokenizer(WordLevel({"a": 0, "b": 1, "<end>": 2, "<s>": 3, "[MASK]": 4}))  # no unk in the model
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<end>", unk_token="<end>",
                                  mask_token="[MASK]")
    fingerprint = tokenizer_fingerprint(tok)
    state = tokenizer_state(tok)
    assert tokenizer_fingerprint(tokenizer_from_state(state)) == fingerprint
    old = {**state, "special": {k: v for k, v in state["special"].items() if k != "unk_token"}}
    assert tokenizer_fingerprint(tokenizer_from_state(old)) != fingerprint  # what the old state alone gives
    meta = {"tokenizer": old, "tokenizer_fingerprint": fingerprint}
    assert model_tokenizer(tmp_path / "last.ckpt", meta, tokenizer_from_state).unk_token == "<end>"
