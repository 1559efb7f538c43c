"""Tiny random checkpoints written in the exact layouts of real ones (config keys, tensor names, shards), each with the
transformers model that holds the same weights: the independent implementation the tests compare against."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LLADA_VOCAB, QWEN_VOCAB = 126464, 151680  # real LLaDA vocabulary; Qwen's real ids (mask 151669) fit under 151680


def _randomise(model, seed: int):
    """Weights far from the init (std 0.2, norms around 1), so outputs depend strongly on every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def save(folder: Path, config: dict, state: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """config.json plus model.safetensors, or `shards` files model-0000k-of-0000n.safetensors and their index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"))
        return folder
    names = sorted(state)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[k::shards]}
        save_file(part, str(folder / file))
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def llama_model(seed=0, vocab=96, d=32, heads=4, kv=2, layers=2, width=48, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=d, num_attention_heads=heads, num_key_value_heads=kv, num_hidden_layers=layers,
                      intermediate_size=width, vocab_size=vocab, max_position_embeddings=64, rms_norm_eps=1e-5,
                      **{"tie_word_embeddings": False, **config})
    return _randomise(LlamaForCausalLM(cfg).float(), seed)


def qwen_model(version: int, seed=0, vocab=QWEN_VOCAB, d=32, heads=4, kv=2, layers=2, width=48, **config):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if version == 2 else (Qwen3Config, Qwen3ForCausalLM)
    cfg = config_cls(hidden_size=d, num_attention_heads=heads, num_key_value_heads=kv, num_hidden_layers=layers,
                     intermediate_size=width, vocab_size=vocab, max_position_embeddings=64,
                     **{"tie_word_embeddings": False, **config})
    return _randomise(model_cls(cfg).float(), seed)


def gpt2_model(seed=0, vocab=96):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_head=4, n_layer=2, n_positions=32, vocab_size=vocab, bos_token_id=vocab - 1,
                     eos_token_id=vocab - 1)
    return _randomise(GPT2LMHeadModel(cfg).float(), seed)


def llada_checkpoint(folder: Path, kv: int = 4, tied: bool = False, shards: int = 2, dtype=torch.float32,
                     mask_token_id: int = 126336):
    """A LLaDA folder (OLMo keys, model.transformer.* names, sharded) and the Llama model with its weights."""
    model = llama_model(vocab=LLADA_VOCAB, kv=kv, rope_theta=500000.0, tie_word_embeddings=tied)
    hf = model.state_dict()
    names = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
             "self_attn.o_proj": "attn_out", "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj",
             "mlp.down_proj": "ff_out", "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm"}
    state = {"model.transformer.wte.weight": hf["model.embed_tokens.weight"],
             "model.transformer.ln_f.weight": hf["model.norm.weight"]}
    if not tied:
        state["model.transformer.ff_out.weight"] = hf["lm_head.weight"]
    for i in range(model.config.num_hidden_layers):
        for theirs, ours in names.items():
            state[f"model.transformer.blocks.{i}.{ours}.weight"] = hf[f"model.layers.{i}.{theirs}.weight"]
    config = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu", "alibi": False,
              "block_type": "llama", "d_model": 32, "n_heads": 4, "n_kv_heads": kv, "n_layers": 2,
              "mlp_hidden_size": 48, "mlp_ratio": 4, "rope": True, "rope_theta": 500000.0, "layer_norm_type": "rms",
              "rms_norm_eps": 1e-5, "max_sequence_length": 64, "vocab_size": LLADA_VOCAB,
              "embedding_size": LLADA_VOCAB, "weight_tying": tied, "include_bias": False, "include_qkv_bias": False,
              "mask_token_id": mask_token_id, "eos_token_id": 126081, "pad_token_id": 126081, "scale_logits": False,
              "attention_layer_norm": False, "input_emb_norm": False, "layer_norm_with_affine": True}
    save(folder, config, {k: v.to(dtype) for k, v in state.items()}, shards=shards)
    return model


def qwen_style_checkpoint(folder: Path, model, model_type: str, architectures: list[str], shards: int = 1, **extra):
    """A folder in the Qwen/Llama layout (Dream, SDAR, or the causal LM itself) holding `model`'s weights."""
    config = {**model.config.to_dict(), "model_type": model_type, "architectures": architectures, **extra}
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return save(folder, config, state, shards=shards)


def gpt2_checkpoint(folder: Path, model, prefix: bool = True) -> Path:
    """GPT-2 as published: Conv1D weights (in, out), the causal-mask buffers of old files, no lm_head (tied)."""
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if not prefix:  # the original openai-community/gpt2 file names its tensors without "transformer."
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
    return save(folder, model.config.to_dict(), state)


def all_visible(B: int, T: int) -> torch.Tensor:
    """A 4-D additive mask letting every query see every key: transformers runs its causal LMs bidirectionally."""
    return torch.zeros(B, 1, T, T)
