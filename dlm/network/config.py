"""`ModelConfig`: the shape and the options of the backbone (dlm.network.transformer.Transformer).

The defaults are dlm's own network: pre-LayerNorm with biases in the norms only, GELU MLP, fused Q/K/V, rotary
positions (theta 10,000), logits at the same position. The other options exist so that the same network can hold
the weights of open checkpoints (dlm/network/families): RMSNorm, SwiGLU, grouped K/V heads, Q/K/V and output
biases, per-head QK-norm, rope theta and scaling, learned absolute positions, shifted predictions. Every field is
a plain scalar, so `model.<field>=value` overrides work for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("rotary", "learned")
ROPE_SCALINGS = ("none", "linear", "llama3")
PREDICTIONS = ("same_position", "shifted")


@dataclass
class ModelConfig:
    """The network (backbone). `vocab_size` is filled in from the tokenizer (or the checkpoint's embedding rows)."""

    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    mlp_ratio: int = 4
    context: int = 128  # the longest sequence the network is trained on (rotary extrapolates past it)
    dropout: float = 0.0
    time_conditioning: bool = False  # adaLN from a time embedding; off by default (MDLM reference)
    cond_dim: int = 128
    tie_weights: bool = False
    vocab_size: int = 0
    # --- options for open checkpoints (defaults = dlm's own network) ---
    norm: str = "layernorm"  # "layernorm" (weight and bias, GPT-2) | "rmsnorm" (weight only, Llama/Qwen/OLMo)
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm's bias (ignored by rmsnorm)
    mlp: str = "gelu"  # "gelu": proj(gelu_tanh(fc(x))) | "swiglu": proj(silu(gate(x)) * fc(x))
    mlp_hidden: int = 0  # the MLP's hidden width; 0 = mlp_ratio * d_model
    n_kv_head: int = 0  # grouped K/V heads (GQA); 0 = n_head. Must divide n_head
    head_dim: int = 0  # per-head width; 0 = d_model // n_head (Qwen3 sets it explicitly)
    fused_qkv: bool = True  # one `qkv` projection (dlm, GPT-2) or separate `q`, `k`, `v` (loaded checkpoints)
    qkv_bias: bool = False  # biases on the Q/K/V projections (Qwen2, GPT-2)
    proj_bias: bool = False  # bias on the attention's output projection (GPT-2)
    mlp_bias: bool = False  # biases on the MLP's layers (GPT-2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before the rotation (Qwen3)
    positions: str = "rotary"  # "rotary" | "learned" (an absolute position table of `context` rows, GPT-2)
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # "none" | "linear" (positions / factor) | "llama3" (Llama 3.1's banded rescale)
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_context: int = 8192  # llama3 only: the pretraining context the bands are measured against
    rope_float32: bool = False  # rotate q and k in float32 and cast back (LLaDA/OLMo's rope_full_precision); else
    # in the weights' dtype with cos/sin rounded to it (Llama, Qwen, Dream). The same in float32
    prediction: str = "same_position"  # "same_position" | "shifted": logits at i come from the hidden state at i-1

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden or self.mlp_ratio * self.d_model

    def problems(self) -> list[str]:
        """What is wrong with this config, one sentence per problem naming the field (empty when usable)."""
        out = []
        if min(self.n_layer, self.d_model, self.n_head) <= 0:
            out.append("model.n_layer, model.d_model and model.n_head must be positive")
        elif not self.head_dim and self.d_model % self.n_head:
            out.append(f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}")
        elif self.head_size % 2 and self.positions == "rotary":
            out.append(f"model.head_dim={self.head_dim} must be even (rotary embeddings rotate pairs)" if self.head_dim
                       else "model.d_model / model.n_head must be even (rotary embeddings rotate pairs)")
        if self.n_head % self.kv_heads:
            out.append(f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head}")
        for name, value, valid in (("norm", self.norm, NORMS), ("mlp", self.mlp, MLPS),
                                   ("positions", self.positions, POSITIONS),
                                   ("rope_scaling", self.rope_scaling, ROPE_SCALINGS),
                                   ("prediction", self.prediction, PREDICTIONS)):
            if value not in valid:
                out.append(f"unknown model.{name} '{value}'; valid: {', '.join(valid)}")
        if self.rope_scaling != "none" and self.rope_factor <= 0:
            out.append(f"model.rope_factor={self.rope_factor} must be positive")
        return out
