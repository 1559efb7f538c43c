"""LLaDA-8B Base/Instruct and iLLaDA: OLMo-style config keys and tensor names (SPEC section 8).

Followed: the `modeling_llada.py` / `configuration_llada.py` published with GSAI-ML/LLaDA-8B-Instruct (block_type
"llama"): `x = ff_out(act(ff_proj(x)) * up_proj(x))` with act = SiLU, so `ff_proj` is the gate and `up_proj` the
up projection; RMSNorm normalised in float32 then scaled; rotate-half RoPE, q and k rotated in float32
and cast back when `rope_full_precision` (true by default in LLaDA's config, as here: `ModelConfig.rope_float32`; the
norms are normalised in float32 in both); no causal mask.
`embedding_size` (the rows of `wte` and `ff_out`, padded for efficiency) may exceed `vocab_size`: the network's
output has `embedding_size` logits, as LLaDA's own code returns; the padded rows are never tokens.
iLLaDA is assumed to share the keys (mask id 5, grouped K/V, tied), recognised by its mask_token_id.
"""

from __future__ import annotations

from dlm.network.config import ModelConfig
from dlm.network.families.base import CheckpointFormatError, Family, ModelDescriptor, first_id, need, register

LLADA_MASK, LLADA_EOT = 126336, 126348  # <|mdm_mask|>, <|eot_id|> of LLaDA's tokenizer


class LLaDA(Family):
    name, model_types, architectures = "llada", ("llada",), ("LLaDAModelLM",)
    fallback_tokens = {"mask_id": "<|mdm_mask|>"}

    def model_config(self, config):
        d, n_head, n_layer, vocab = need(config, self.name, "d_model", "n_heads", "n_layers", "vocab_size")
        unsupported = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True,
                       "alibi": False, "attention_layer_norm": False, "scale_logits": False, "input_emb_norm": False,
                       "layer_norm_with_affine": True}
        for key, wanted in unsupported.items():
            if key in config and config[key] != wanted:
                raise CheckpointFormatError(f"llada: config.json has {key}={config[key]!r}; only {wanted!r} is "
                                            "supported")
        width = config.get("mlp_hidden_size") or config.get("mlp_ratio", 4) * d
        bias = bool(config.get("include_bias", False))
        return ModelConfig(n_layer=n_layer, n_head=n_head, d_model=d, n_kv_head=config.get("n_kv_heads") or n_head,
                           mlp="swiglu", mlp_hidden=width, vocab_size=config.get("embedding_size") or vocab,
                           context=config.get("max_sequence_length", 4096), norm="rmsnorm",
                           norm_eps=float(config.get("rms_norm_eps", 1e-5)), fused_qkv=False,
                           qkv_bias=bool(config.get("include_qkv_bias", bias)), proj_bias=bias, mlp_bias=bias,
                           rope_theta=float(config.get("rope_theta", 10000.0)),
                           rope_float32=bool(config.get("rope_full_precision", True)),
                           tie_weights=bool(config.get("weight_tying", False)))

    def descriptor(self, config, model):
        ids = {f"{name}_id": first_id(config.get(f"{name}_token_id")) for name in ("mask", "pad", "eos", "bos")}
        return ModelDescriptor(family=self.name, vocab_size=model.vocab_size, **ids)

    def fallback_ids(self, config, model):
        """LLaDA's mask; its <|eot_id|> only for LLaDA's own tokenizer (recognised by its mask id)."""
        mask = first_id(config.get("mask_token_id"))
        return {"mask_id": LLADA_MASK, **({"eot_id": LLADA_EOT} if mask in (None, LLADA_MASK) else {})}

    def module_names(self, model):
        b = "model.transformer.blocks.{i}"
        return {"embed": "model.transformer.wte", "blocks.{i}.ln1": f"{b}.attn_norm",
                "blocks.{i}.attn.q": f"{b}.q_proj", "blocks.{i}.attn.k": f"{b}.k_proj",
                "blocks.{i}.attn.v": f"{b}.v_proj", "blocks.{i}.attn.proj": f"{b}.attn_out",
                "blocks.{i}.ln2": f"{b}.ff_norm", "blocks.{i}.mlp.gate": f"{b}.ff_proj",
                "blocks.{i}.mlp.fc": f"{b}.up_proj", "blocks.{i}.mlp.proj": f"{b}.ff_out",
                "ln_f": "model.transformer.ln_f", "head": "model.transformer.ff_out"}


register(LLaDA())
