"""Adaptation of a causal LM into a diffusion LM (`dlm train init_from=hf:PATH process=mdlm`, dlm/train/adapt.py):
the network starts from the causal LM's weights (shifted, run bidirectionally), the tokenizer gains a [MASK], the
run trains, exports, loads, generates and resumes."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest
import torch

from dlm.config import ConfigError
from dlm.network.transformer import Transformer
from dlm.train.adapt import load_causal_lm
from tests.network.checkpoints import all_visible, llama_model, qwen_model, qwen_style_checkpoint

VOCAB = 96


def _tokenizer(folder: Path, texts_folder: Path) -> None:
    """A word-level tokenizer of VOCAB tokens (<unk>, <s>, <eos> at Llama's ids 0, 1, 2, then the commonest words of
    the test corpus), no pad and no mask token, as a causal LM ships it."""
    from collections import Counter

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = Counter(w for f in sorted(texts_folder.glob("*.txt")) for w in f.read_text().split())
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "<eos>"])}
    for w, _ in words.most_common():
        if len(vocab) == VOCAB:
            break
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(str(folder))


@pytest.fixture(scope="module")
def causal_folder(tmp_path_factory, text_folder) -> tuple[Path, object]:
    """A tiny random Llama folder (config.json, model.safetensors, tokenizer.json) and the transformers model."""
    folder = tmp_path_factory.mktemp("llama")
    model = llama_model(vocab=VOCAB)
    qwen_style_checkpoint(folder, model, "llama", ["LlamaForCausalLM"])
    _tokenizer(folder, text_folder)
    return folder, model


def _args(micro_args, out: Path, folder, *extra) -> list[str]:
    keep = [a for a in micro_args(out) if not a.startswith("model.") or a.startswith("model.context=")]
    return ["train", f"init_from=hf:{folder}", "process=mdlm", *keep, "trainer.max_steps=4", "trainer.ckpt_every=2",
            "trainer.val_every=2", "trainer.attention_anneal_steps=2", *extra]


@torch.no_grad()
def test_adapted_network_is_the_causal_lm_run_bidirectionally(causal_folder):
    folder, model = causal_folder
    init = load_causal_lm(f"hf:{folder}", context=32, data_vocab_size=300)
    tok, cfg = init.tokenizer, init.cfg
    assert (cfg.model.prediction, cfg.model.context, cfg.data.tokenizer) == ("shifted", 32, f"hf:{folder}")
    # [MASK] and [PAD] added after the vocabulary; the embedding and head grew by those rows, set to the mean row
    assert tok.mask_token_id == cfg.process.mask_id and len(tok) == VOCAB + 2 == cfg.model.vocab_size
    embed = model.model.embed_tokens.weight
    assert torch.equal(init.state["embed.weight"][:VOCAB], embed)
    assert torch.allclose(init.state["embed.weight"][VOCAB:], embed.mean(0).expand(2, -1))
    network = Transformer(cfg.model)
    network.load_state_dict(init.state)
    x = torch.randint(0, VOCAB, (2, 10))
    ref = model(x, attention_mask=all_visible(*x.shape)).logits  # the causal LM with its causal mask removed
    ours = network.eval()(x)[..., :VOCAB]
    assert torch.allclose(ours[:, 1:], ref[:, :-1], atol=1e-4)  # position i - 1 predicts token i


def test_adapt_trains_exports_loads_generates_and_resumes(causal_folder, micro_args, tmp_path):
    import dlm
    from dlm.cli import main

    folder, model = causal_folder
    out = tmp_path / "adapted"
    assert main(_args(micro_args, out, folder)) == 0
    rows = list(csv.DictReader(open(next((out / "logs").glob("part-*/metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    lm = dlm.load(out)
    assert lm.network.cfg.prediction == "shifted" and lm.trained_steps == 4
    assert lm.process.default_sampler == "dream"  # Dream's recipe: sampled by Dream's own rule unless told otherwise
    assert lm.cfg.process.mask_id == lm.tokenizer.mask_token_id == VOCAB
    assert lm.network.embed.weight.shape == (VOCAB + 2, 32)
    # the run's tokenizer is the causal LM's own (its words, its ids), plus [MASK] and [PAD]
    assert lm.tokenizer.convert_ids_to_tokens([1, 2]) == ["<s>", "<eos>"]
    gen = lm.generate("the", length=12, steps=4)
    assert len(gen.texts) == 1 and gen.tokens.shape == (1, 12)
    # the same command again with more steps resumes from checkpoints/last.ckpt
    assert main(_args(micro_args, out, folder, "trainer.max_steps=6")) == 0
    assert dlm.load(out).trained_steps == 6


def test_qwen2_folder_adapts(tmp_path, text_folder):
    model = qwen_model(2, vocab=VOCAB)
    qwen_style_checkpoint(tmp_path, model, "qwen2", ["Qwen2ForCausalLM"], bos_token_id=1, eos_token_id=2)
    _tokenizer(tmp_path, text_folder)
    init = load_causal_lm(f"hf:{tmp_path}", context=16, data_vocab_size=300)
    assert init.cfg.model.qkv_bias and init.cfg.model.vocab_size == VOCAB + 2


def test_bad_init_from_is_a_config_error(tmp_path, micro_args):
    from dlm.cli import main

    with pytest.raises(ConfigError, match="does not exist"):
        load_causal_lm(f"hf:{tmp_path / 'nope'}", 32, 300)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a Hugging Face model folder"):
        load_causal_lm(f"hf:{tmp_path / 'empty'}", 32, 300)
    assert main(_args(micro_args, tmp_path / "run", tmp_path / "nope")) == 2


@pytest.mark.skipif(not os.environ.get("DLM_GGUF_TESTS"), reason="loads the 100 MB SmolLM2 GGUF (set DLM_GGUF_TESTS=1)")
def test_smollm2_short_name():
    init = load_causal_lm("hf:smollm2", context=32, data_vocab_size=300)
    assert init.cfg.model.prediction == "shifted" and init.tokenizer.mask_token_id == init.cfg.process.mask_id
    assert init.cfg.model.vocab_size >= len(init.tokenizer)


@torch.no_grad()
def test_annealed_attention_widens_from_causal_to_bidirectional(causal_folder):
    from dlm.train.adapt import AnnealedAttention, anneal_window

    folder, _ = causal_folder
    init = load_causal_lm(f"hf:{folder}", context=32, data_vocab_size=300)
    network = Transformer(init.cfg.model)
    network.load_state_dict(init.state)
    network.eval()
    x = torch.randint(0, VOCAB, (1, 8))
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % VOCAB  # change token 5: who sees it?
    assert [anneal_window(s, 4, 8) for s in (0, 1, 2, 4, 9)] == [0, 2, 4, 8, 8]
    # Shifted: the logits at i read the hidden state at i - 1 (position 0 its own); with 2 layers a window w lets
    # the hidden state at j see keys <= j + 2w. Window 0 is the causal LM.
    for window, first_changed in ((0, 6), (2, 2), (8, 0)):
        net = AnnealedAttention(network, window)
        diff = (net(x) - net(y)).abs().amax(-1)[0]
        assert (diff[:first_changed] == 0).all() and diff[first_changed] > 0
    assert net.cfg is network.cfg


def test_lora_trains_adapters_only_and_merges_them_at_export(causal_folder, micro_args, tmp_path):
    pytest.importorskip("peft")
    import dlm
    from dlm.checkpoint import read_checkpoint
    from dlm.cli import main

    folder, model = causal_folder
    out = tmp_path / "lora"
    args = _args(micro_args, out, folder, "trainer.lora_rank=4", "trainer.ema=0", "optim.lr=1e-2")
    assert main(args) == 0
    state = read_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"]
    q = "network.blocks.0.attn.q"
    source_q = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(state[f"{q}.base_layer.weight"], source_q)  # frozen
    assert state[f"{q}.lora_B.default.weight"].abs().max() > 0  # trained
    lm = dlm.load(out)  # the export: plain names, adapters merged
    merged = lm.network.blocks[0].attn.q.weight
    delta = state[f"{q}.lora_B.default.weight"] @ state[f"{q}.lora_A.default.weight"] * (16.0 / 4)
    assert torch.allclose(merged, source_q + delta, atol=1e-6)
    assert not torch.equal(lm.network.embed.weight[:VOCAB], model.model.embed_tokens.weight)  # trained too
    assert len(lm.generate("the", length=12, steps=4).texts) == 1
    # the checkpoint itself loads too: its adapters merged as at export (the same weights: the export is of it)
    from_ckpt = dlm.load(out / "checkpoints" / "last.ckpt")
    for name, value in lm.network.state_dict().items():
        assert torch.allclose(from_ckpt.network.state_dict()[name], value, atol=1e-6), name
    # resumed with EMA switched on (the micro run's 0.99): the EMA of the adapters starts from the restored ones
    assert main(_args(micro_args, out, folder, "trainer.lora_rank=4", "optim.lr=1e-2",
                      "trainer.max_steps=6")) == 0
    assert dlm.load(out).trained_steps == 6


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_soft_masking_trains_on_top_of_an_adapted_causal_lm(causal_folder, micro_args, tmp_path, lora):
    """The SM paper's continued-training setting from the CLI: a causal LM adapted into an MDLM with the soft-masking
    process on top (its mixer trained with the network, or with the LoRA adapters); the export loads as a
    soft-masked, shifted model, samples with its learned mixing and resumes."""
    if lora:
        pytest.importorskip("peft")
    import dlm
    from dlm.checkpoint import read_checkpoint
    from dlm.cli import main

    folder, _ = causal_folder
    out = tmp_path / "sm"
    # w_b = -6 so that lambda is not ~0 on the random network's high-entropy predictions and w visibly moves
    extra = ["softmask.enabled=true", "softmask.omega_s=0.3", "softmask.omega_b=-6.0", "softmask.p_sm=0.5",
             *(["trainer.lora_rank=4"] if lora else [])]
    assert main(_args(micro_args, out, folder, *extra)) == 0
    state = read_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"]
    mixer = {k: v for k, v in state.items() if k.startswith("process.mixer.")}
    assert mixer, sorted(state)[:5]
    lm = dlm.load(out)
    assert lm.process.name == "softmask" and lm.network.cfg.prediction == "shifted"
    assert lm.process.default_sampler == "ancestral_cache"  # soft-masking's feedback goes with MDLM's sampler
    assert lm.cfg.process.mask_id == lm.tokenizer.mask_token_id == VOCAB
    from dlm.softmask.mixer import SoftMaskMixer

    initial = SoftMaskMixer(omega_s=0.3, omega_b=-6.0)  # the run's initial omegas
    trained = state["process.mixer.raw_s"]
    assert not torch.allclose(trained, initial.raw_s)  # the mixer learned, with the network or its adapters
    assert not torch.allclose(lm.process.mixer.raw_s.float(), initial.raw_s)  # and the export holds it (EMA'd)
    plain = lm.generate("the", length=12, steps=4, seed=0, softmask=False)
    soft = lm.generate("the", length=12, steps=4, seed=0)
    assert soft.tokens.shape == plain.tokens.shape == (1, 12)
    assert main(_args(micro_args, out, folder, *extra, "trainer.max_steps=6")) == 0
    assert dlm.load(out).trained_steps == 6
