"""Loading refuses bad folders with a message naming the fault, reads nothing before every check has passed, never
initialises weights randomly, and checks the folder's tokenizer against the model."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dlm.network.families.loading as loading
from dlm.network.families import CheckpointFormatError, load_pretrained_network, load_pretrained_tokenizer
from tests.network.checkpoints import gpt2_checkpoint, gpt2_model, llada_checkpoint


@pytest.fixture
def llada(tmp_path):
    folder = tmp_path / "llada"
    llada_checkpoint(folder, shards=2)
    return folder


@pytest.fixture
def reads(monkeypatch):
    """Counts the tensors read from checkpoint files."""
    count = []
    real = loading.SafetensorsFolder.tensor
    monkeypatch.setattr(loading.SafetensorsFolder, "tensor", lambda self, name: count.append(name) or real(self, name))
    return count


def refused(folder, match, reads):
    with pytest.raises(CheckpointFormatError, match=match):
        load_pretrained_network(folder)
    assert reads == []  # every check happens before any tensor is read or assigned


def test_missing_shard(llada, reads):
    (llada / "model-00002-of-00002.safetensors").unlink()
    refused(llada, r"shard model-00002-of-00002.safetensors listed in model.safetensors.index.json is missing", reads)


def test_wrong_shape_names_the_tensor(llada, reads):
    shard = llada / "model-00001-of-00002.safetensors"
    state = load_file(shard)
    name = next(n for n in state if n.endswith("blocks.1.k_proj.weight") or n.endswith("blocks.0.k_proj.weight"))
    state[name] = torch.zeros(8, 32)
    save_file(state, str(shard))
    refused(llada, rf"tensor {name} has shape \(8, 32\), expected \(32, 32\)", reads)


def test_missing_and_unexpected_tensors(llada, reads):
    index = json.loads((llada / "model.safetensors.index.json").read_text())
    shard = llada / "model-00001-of-00002.safetensors"
    state = load_file(shard)
    victim = sorted(state)[0]
    del state[victim], index["weight_map"][victim]
    state["model.transformer.blocks.0.extra.weight"] = torch.zeros(2)
    index["weight_map"]["model.transformer.blocks.0.extra.weight"] = shard.name
    save_file(state, str(shard))
    (llada / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(llada, rf"missing tensor {victim}.*unexpected tensors \['model.transformer.blocks.0.extra.weight'\]", reads)


def test_truncated_file(tmp_path, reads):
    llada_checkpoint(tmp_path, shards=1)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    refused(tmp_path, "does not fit its byte range", reads)


def test_unknown_family_names_what_is_missing(llada, reads):
    config = json.loads((llada / "config.json").read_text())
    (llada / "config.json").write_text(json.dumps({**config, "model_type": "mamba", "architectures": ["Mamba"]}))
    refused(llada, r"matches no known checkpoint family: model_type='mamba'.*Known: llama", reads)
    del config["d_model"]
    (llada / "config.json").write_text(json.dumps(config))
    refused(llada, "looks like a llada checkpoint but lacks d_model", reads)
    (llada / "config.json").write_text(json.dumps({**config, "d_model": 32, "activation_type": "gelu"}))
    refused(llada, "activation_type='gelu'; only 'silu' is supported", reads)


def test_mask_id_outside_the_vocabulary(tmp_path, reads):
    llada_checkpoint(tmp_path, shards=1, mask_token_id=126464)
    refused(tmp_path, "mask_id=126464 is outside the vocabulary of 126464 tokens", reads)


def test_no_random_initialisation(llada, monkeypatch):
    """The network is built on the meta device: no init function ever touches a real tensor."""
    def fail_on_real(tensor, *args, **kwargs):
        assert tensor.device.type == "meta", "a weight was randomly initialised before loading"
        return tensor

    for name in ("normal_", "zeros_", "ones_", "uniform_", "kaiming_uniform_"):
        monkeypatch.setattr(torch.nn.init, name, fail_on_real)
    net, _ = load_pretrained_network(llada)
    assert all(p.device.type == "cpu" for p in net.parameters())


def _tokenizer(folder, words: int, eos: str = "<eos>"):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<pad>": 1, **{f"w{i}": i + 2 for i in range(words - 2)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<pad>").save_pretrained(str(folder))


def test_tokenizer_checked_against_the_model(tmp_path):
    model = gpt2_model(vocab=96)
    model.config.eos_token_id = model.config.bos_token_id = 0
    model.config.pad_token_id = 1
    gpt2_checkpoint(tmp_path, model)
    _, desc = load_pretrained_network(tmp_path)
    _tokenizer(tmp_path, 96)
    tok = load_pretrained_tokenizer(tmp_path, desc)
    assert (len(tok), tok.eos_token_id, tok.padding_side) == (96, 0, "left")
    _tokenizer(tmp_path, 97)
    with pytest.raises(CheckpointFormatError, match="has 97 tokens but the model's output layer has 96 rows"):
        load_pretrained_tokenizer(tmp_path, desc)
    _tokenizer(tmp_path, 96, eos="w5")
    with pytest.raises(CheckpointFormatError, match="the tokenizer's eos_token_id is 7 but the gpt2 model's eos_id is 0"):
        load_pretrained_tokenizer(tmp_path, desc)
