"""Causal LMs to adapt into diffusion LMs (Dream's recipe, arXiv 2410.17891): Llama, Qwen2, Qwen3 and GPT-2.

Followed: transformers 5 `modeling_llama`, `modeling_qwen2`, `modeling_qwen3`, `modeling_gpt2` (the installed
5.24 code). An adapted causal LM keeps its next-token head, so its predictions are `shifted`; the descriptor
records the attention it was trained with (causal) and no mask token (corruption "none"): adaptation adds both.
The Llama-style helpers here also serve Dream and SDAR, which share the layout.
"""

from __future__ import annotations

from typing import Any

from dlm.network.config import ModelConfig
from dlm.network.families.base import (CheckpointFormatError, Family, ModelDescriptor, first_id, need,
                                       register)

# dlm module -> Llama/Qwen module ({i}: layer). Parameter names (weight, bias) are appended to both sides.
LLAMA_MODULES = {
    "embed": "model.embed_tokens",
    "blocks.{i}.ln1": "model.layers.{i}.input_layernorm",
    "blocks.{i}.attn.q": "model.layers.{i}.self_attn.q_proj",
    "blocks.{i}.attn.k": "model.layers.{i}.self_attn.k_proj",
    "blocks.{i}.attn.v": "model.layers.{i}.self_attn.v_proj",
    "blocks.{i}.attn.q_norm": "model.layers.{i}.self_attn.q_norm",
    "blocks.{i}.attn.k_norm": "model.layers.{i}.self_attn.k_norm",
    "blocks.{i}.attn.proj": "model.layers.{i}.self_attn.o_proj",
    "blocks.{i}.ln2": "model.layers.{i}.post_attention_layernorm",
    "blocks.{i}.mlp.gate": "model.layers.{i}.mlp.gate_proj",
    "blocks.{i}.mlp.fc": "model.layers.{i}.mlp.up_proj",
    "blocks.{i}.mlp.proj": "model.layers.{i}.mlp.down_proj",
    "ln_f": "model.norm",
    "head": "lm_head",
}


def rope_options(config: dict[str, Any], family: str) -> dict[str, Any]:
    """rope theta and scaling from either layout: transformers 5's `rope_parameters` or the older `rope_theta` +
    `rope_scaling`. Supported scalings: none/default, linear, llama3; others are refused by name."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind in ("default", None):
        return out
    if kind not in ("linear", "llama3"):
        raise CheckpointFormatError(f"{family}: rope scaling '{kind}' is not supported (supported: linear, llama3)")
    out.update(rope_scaling=kind, rope_factor=float(merged["factor"]))
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(merged["low_freq_factor"]),
                   rope_high_freq_factor=float(merged["high_freq_factor"]),
                   rope_original_context=int(merged.get("original_max_position_embeddings",
                                                        config.get("max_position_embeddings", 8192))))
    return out


def llama_style_config(config: dict[str, Any], family: str, **options) -> ModelConfig:
    """A ModelConfig for the Llama layout (RMSNorm, SwiGLU, rotary, separate Q/K/V) from Hugging Face keys."""
    d, n_head, n_layer, width, vocab = need(config, family, "hidden_size", "num_attention_heads",
                                            "num_hidden_layers", "intermediate_size", "vocab_size")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointFormatError(f"{family}: hidden_act '{act}' is not supported (the SwiGLU MLP uses silu)")
    bias = bool(config.get("attention_bias", False))
    fields = dict(n_layer=n_layer, n_head=n_head, d_model=d, n_kv_head=config.get("num_key_value_heads") or n_head,
                  head_dim=config.get("head_dim") or 0, mlp="swiglu", mlp_hidden=width, vocab_size=vocab,
                  context=config.get("max_position_embeddings", 4096), norm="rmsnorm",
                  norm_eps=float(config.get("rms_norm_eps", 1e-6)), fused_qkv=False, qkv_bias=bias, proj_bias=bias,
                  mlp_bias=bool(config.get("mlp_bias", False)),
                  tie_weights=bool(config.get("tie_word_embeddings", False)), prediction="shifted")
    fields.update(rope_options(config, family))
    fields.update(options)
    if fields["head_dim"] == d // n_head:
        fields["head_dim"] = 0  # the default width: keep the config minimal
    return ModelConfig(**fields)


def causal_descriptor(family: str, config: dict[str, Any], model: ModelConfig) -> ModelDescriptor:
    """A plain causal LM: shifted, causal, no mask token."""
    return ModelDescriptor(family=family, vocab_size=model.vocab_size, pad_id=first_id(config.get("pad_token_id")),
                           eos_id=first_id(config.get("eos_token_id")), bos_id=first_id(config.get("bos_token_id")),
                           prediction="shifted", topology="causal", corruption="none", padding_side="left")


class LlamaStyle(Family):
    """Llama-layout causal LMs; subclasses set the family's fixed options."""

    options: dict[str, Any] = {}

    def model_config(self, config):
        return llama_style_config(config, self.name, **self.options)

    def descriptor(self, config, model):
        return causal_descriptor(self.name, config, model)

    def module_names(self, model):
        return LLAMA_MODULES

    def ignored(self, name, model):
        return model.tie_weights and name == "lm_head.weight"  # a tied head saved anyway (transformers' state_dict)


class Llama(LlamaStyle):
    name, model_types, architectures = "llama", ("llama",), ("LlamaForCausalLM",)


class Qwen2(LlamaStyle):
    name, model_types, architectures = "qwen2", ("qwen2",), ("Qwen2ForCausalLM",)
    options = {"qkv_bias": True, "proj_bias": False}  # Qwen2: biases on q, k, v only


class Qwen3(LlamaStyle):
    name, model_types, architectures = "qwen3", ("qwen3",), ("Qwen3ForCausalLM",)
    options = {"qk_norm": True}


class GPT2(Family):
    """GPT-2: LayerNorm with biases, learned positions, fused Conv1D weights stored (in, out), tied head."""

    name, model_types, architectures = "gpt2", ("gpt2",), ("GPT2LMHeadModel",)
    transposed = ("blocks.{i}.attn.qkv", "blocks.{i}.attn.proj", "blocks.{i}.mlp.fc", "blocks.{i}.mlp.proj")

    def model_config(self, config):
        d, n_head, n_layer, context, vocab = need(config, self.name, "n_embd", "n_head", "n_layer", "n_positions",
                                                  "vocab_size")
        act = config.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointFormatError(f"gpt2: activation_function '{act}' is not supported (tanh GELU only)")
        if not config.get("tie_word_embeddings", True):
            raise CheckpointFormatError("gpt2: an untied head is not supported")
        return ModelConfig(n_layer=n_layer, n_head=n_head, d_model=d, mlp_hidden=config.get("n_inner") or 4 * d,
                           context=context, vocab_size=vocab, norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
                           positions="learned", qkv_bias=True, proj_bias=True, mlp_bias=True, tie_weights=True,
                           prediction="shifted")

    def descriptor(self, config, model):
        return causal_descriptor(self.name, config, model)

    def module_names(self, model):
        return {"embed": "transformer.wte", "pos_embed": "transformer.wpe", "blocks.{i}.ln1": "transformer.h.{i}.ln_1",
                "blocks.{i}.attn.qkv": "transformer.h.{i}.attn.c_attn",
                "blocks.{i}.attn.proj": "transformer.h.{i}.attn.c_proj", "blocks.{i}.ln2": "transformer.h.{i}.ln_2",
                "blocks.{i}.mlp.fc": "transformer.h.{i}.mlp.c_fc", "blocks.{i}.mlp.proj": "transformer.h.{i}.mlp.c_proj",
                "ln_f": "transformer.ln_f"}

    def ignored(self, name, model):
        # The causal-mask buffers of old checkpoints, and the tied head's copy.
        return name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight"


for _family in (Llama(), Qwen2(), Qwen3(), GPT2()):
    register(_family)
