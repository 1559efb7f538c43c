"""DiffusionGemma (google/diffusiongemma-26B-A4B-it): transformers' own `DiffusionGemmaForBlockDiffusion` behind dlm's
network contract (dlm/network/base.py), so dlm's samplers, callbacks, server and evaluation run on it.

Followed: transformers 5.25, `models/diffusion_gemma/modeling_diffusion_gemma.py` and
`generation_diffusion_gemma.py`. The model is one Gemma-4 MoE stack used in two modes that share every weight:

- the **encoder** reads the context (prompt, committed canvases) **causally** — sliding-window layers see the last
  `sliding_window` positions, full layers everything — and writes its keys/values to the KV cache;
- the **decoder** reads a canvas (`canvas_length` tokens, 256) **bidirectionally**, attending to the cached context
  and to the whole canvas, and never writes the cache. transformers' sliding layers keep the last
  `sliding_window - 1` context keys (`DynamicSlidingWindowLayer`) and attend to all of them and to the canvas.
  Its input is `post_norm(E[z]·√C + SC(pre_norm(softmax(ℓ)·E·√C)))`: the scaled token embeddings plus the
  self-conditioning block (a GeGLU MLP between an RMSNorm and an RMSNorm without scale, `DiffusionGemmaSelfConditioning`)
  of the previous step's logits ℓ; zero signal on the first step (the MLP of zero is zero).
- logits: `lm_head` (tied to the embeddings), then `30·tanh(logits/30)` in float32.

Here the network contract maps onto the two modes:

- a call that writes the cache (`cache_update`) or asks for `causal=True` runs the **encoder** over its tokens (token ids
  only); the logits are the encoder's own (its head; a sampler encoding context asks for none: `logits_at=slice(0, 0)`);
- any other call runs the **decoder** over its tokens as a canvas, after the cached context. Its `inputs_embeds` are
  the decoder's input *after* the self-conditioning block; `embed_tokens(ids)` is that input with no signal, so
  `forward(inputs_embeds=embed_tokens(ids))` is `forward(input_ids=ids)`, and `self_conditioned_inputs(ids, logits)`
  is the input with the previous logits fed back (what the `diffusion_gemma` process's feedback gives samplers).

dlm's `KVCache` holds every context key of every layer (transformers keeps only the sliding window's on sliding
layers); the masks built here give each layer exactly the keys transformers' cache would hold, so the logits are the
same. Per-row `key_valid` (left padding) and `positions` work as for every network. Images (the vision tower) are
not loaded: dlm is text only. Weights: the safetensors files are memory-mapped and their tensors become the
parameters (no copy), the encoder's weights tied to the decoder's as transformers ties them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlm.network.base import select_positions
from dlm.network.config import ModelConfig
from dlm.network.families.base import CheckpointFormatError, Family, ModelDescriptor, first_id, need, register
from dlm.network.kv_cache import KVCache, appended_columns, updates_cache


class _Cache:
    """The cache interface transformers' attention layers use (`update`, `layers[i].keys/values`), over the full keys
    of a dlm `KVCache`: the encoder's `update` appends, the decoder reads."""

    is_compileable = False

    class Layer:
        def __init__(self, keys, values):
            self.keys, self.values = keys, values

    def __init__(self, layers):
        self.layers = [self.Layer(k, v) for k, v in layers]

    def update(self, keys, values, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        layer.keys, layer.values = torch.cat((layer.keys, keys), 2), torch.cat((layer.values, values), 2)
        return layer.keys, layer.values


class _Head(nn.Module):
    """transformers' output: `lm_head`, then the soft cap `cap·tanh(logits / cap)` in float32."""

    def __init__(self, lm_head: nn.Linear, cap: float | None):
        super().__init__()
        self.lm_head, self.cap = lm_head, cap

    def forward(self, hidden):
        logits = self.lm_head(hidden).float()
        return logits if not self.cap else torch.tanh(logits / self.cap) * self.cap


class _Embedding:
    """`network.embed`: `weight` is the embedding matrix E (V, C); calling it gives the decoder's input embeddings."""

    def __init__(self, network: "DiffusionGemmaNetwork"):
        self._network = network

    @property
    def weight(self) -> torch.Tensor:
        return self._network.decoder.embed_tokens.weight

    def __call__(self, ids):
        return self._network.embed_tokens(ids)


class DiffusionGemmaNetwork(nn.Module):
    """A `DiffusionGemmaForBlockDiffusion` (its `model`) behind dlm's network contract (module docstring)."""

    prediction = "same_position"
    gradient_checkpointing = False
    ce_chunk = 0

    def __init__(self, model, cfg: ModelConfig):
        super().__init__()
        self.model, self.cfg = model, cfg
        text = model.config.text_config
        self.text = text
        self.encoder = model.model.encoder.language_model
        self.decoder = model.model.decoder
        self.head = _Head(model.lm_head, text.final_logit_softcapping)
        self.embed = _Embedding(self)
        self.window = text.sliding_window  # a sliding layer's query at p sees keys at p - window < k <= p

    # ------------------------------------------------------------------------------------ contract properties
    @property
    def context(self) -> int:
        return self.cfg.context

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    @property
    def canvas_length(self) -> int:
        return self.model.config.canvas_length

    # ------------------------------------------------------------------------------------ inputs
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's input embeddings (B, T, C) of a canvas without self-conditioning signal."""
        embeds = self.decoder.embed_tokens(input_ids)
        return self.decoder.self_conditioning(embeds, torch.zeros_like(embeds))

    def self_conditioned_inputs(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The decoder's input embeddings (B, T, C) of the canvas input_ids (B, T) fed the previous step's logits
        (B, T, V), as `DiffusionGemmaDecoderModel.forward` computes them from `self_conditioning_logits`."""
        table = self.decoder.embed_tokens
        embeds = table(input_ids)
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(table.weight.dtype)
        soft = torch.matmul(probs, table.weight) * table.embed_scale.to(embeds.dtype)
        return self.decoder.self_conditioning(embeds, soft)

    # ------------------------------------------------------------------------------------ forward
    def forward(self, input_ids=None, inputs_embeds=None, t=None, attn_mask=None, causal=False, positions=None,
                kv_cache=None, cache_update=False, return_hidden=False, logits_at=None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        encode = causal or updates_cache(cache_update)
        if encode and input_ids is None:
            raise ValueError("DiffusionGemma encodes its context (a causal or cache-writing call) from token ids; "
                             "inputs_embeds are the decoder's canvas inputs (pass input_ids)")
        x = input_ids if input_ids is not None else inputs_embeds
        B, T = x.shape[:2]
        device = x.device
        cached = 0 if kv_cache is None else kv_cache.length
        if positions is None:
            positions = torch.arange(cached, cached + T, device=device)
        position_ids = positions if positions.dim() == 2 else positions[None].expand(B, -1)
        stack = self.encoder if encode else self.decoder
        cache = _Cache(kv_cache.layers if kv_cache is not None and kv_cache.layers else self._empty_layers(B, x))
        masks = self._masks(B, T, cached, encode, attn_mask, kv_cache, device)
        if encode:
            hidden = self.encoder.embed_tokens(input_ids)
        else:
            hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.to(self.embed.weight.dtype)
        rope = {kind: stack.rotary_emb(hidden, position_ids, kind) for kind in set(self.text.layer_types)}
        for i, layer in enumerate(stack.layers):
            kind = self.text.layer_types[i]
            hidden = layer(hidden, position_embeddings=rope[kind], attention_mask=masks[kind],
                           position_ids=position_ids, cache=cache)
        hidden = stack.norm(hidden)
        if encode and updates_cache(cache_update):
            if appended_columns(cache_update, T) is not None:
                raise ValueError("DiffusionGemma's encoder appends every position it reads (cache_update=True or a "
                                 "(batch, length) mask of valid keys), not a subset of them")
            if kv_cache is None:
                raise ValueError("cache_update needs a kv_cache to write to (pass kv_cache=KVCache())")
            kv_cache.layers = [(layer.keys, layer.values) for layer in cache.layers]
            kv_cache.append_valid(cache_update, B, T, device)
        hidden = select_positions(hidden, logits_at)
        return hidden if return_hidden else self.head(hidden)

    def next_token_logits(self, input_ids=None, inputs_embeds=None, positions=None, kv_cache=None,
                          cache_update=False, return_hidden=False, logits_at=None, attn_mask=None) -> torch.Tensor:
        """The encoder's (causal) logits: position l's are its head's output there."""
        return self.forward(input_ids, inputs_embeds, attn_mask=attn_mask, causal=True, positions=positions,
                            kv_cache=kv_cache, cache_update=cache_update, return_hidden=return_hidden,
                            logits_at=logits_at)

    def _empty_layers(self, B: int, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zero-length keys/values (B, n_kv, 0, head_dim) for each layer: the cache of a call without context."""
        out = []
        dtype = self.embed.weight.dtype
        for layer in self.decoder.layers:
            attn = layer.self_attn
            n_kv = attn.k_proj.out_features // attn.head_dim
            empty = torch.zeros(B, n_kv, 0, attn.head_dim, dtype=dtype, device=x.device)
            out.append((empty, empty))
        return out

    def _masks(self, B, T, S, encode, attn_mask, kv_cache, device) -> dict[str, torch.Tensor]:
        """Bool attention masks (B, 1, T, S + T), True = may attend, for each layer type: the caller's `attn_mask`
        and the cache's `key_valid`, and
        encoder: causal (query i at S + i sees keys k <= S + i), sliding layers also k > S + i - window;
        decoder: every cached key and the whole canvas; sliding layers only the last window - 1 cached keys."""
        q = torch.arange(S, S + T, device=device)[:, None]  # (T, 1) absolute query index
        k = torch.arange(S + T, device=device)[None, :]  # (1, S + T)
        if encode:
            full = k <= q
            sliding = full & (k > q - self.window)
        else:
            full = torch.ones(T, S + T, dtype=torch.bool, device=device)
            sliding = (k >= S - (self.window - 1)).expand(T, -1)  # canvas keys (k >= S) always
        given = torch.ones(B, 1, T, S + T, dtype=torch.bool, device=device)
        if attn_mask is not None:
            given = given & attn_mask.to(device)
        if kv_cache is not None and kv_cache.key_valid is not None:
            given = given & kv_cache.attention_mask(B, T, device)
        return {"full_attention": given & full, "sliding_attention": given & sliding}


# ----------------------------------------------------------------------------------------------- the family
class DiffusionGemma(Family):
    name, model_types, architectures = "diffusion_gemma", ("diffusion_gemma",), ("DiffusionGemmaForBlockDiffusion",)

    def model_config(self, config):
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise CheckpointFormatError("config.json looks like a diffusion_gemma checkpoint but has no text_config")
        d, n_head, n_layer, vocab = need(text, self.name, "hidden_size", "num_attention_heads", "num_hidden_layers",
                                         "vocab_size")
        return ModelConfig(n_layer=n_layer, n_head=n_head, d_model=d, n_kv_head=text.get("num_key_value_heads") or 0,
                           head_dim=text.get("head_dim") or 0, vocab_size=vocab, norm="rmsnorm",
                           norm_eps=float(text.get("rms_norm_eps", 1e-6)), mlp="swiglu",
                           mlp_hidden=text.get("intermediate_size") or 0, fused_qkv=False, qk_norm=True,
                           context=int(text.get("max_position_embeddings", 131_072)),
                           tie_weights=bool(config.get("tie_word_embeddings", True)))

    def descriptor(self, config, model):
        text = config.get("text_config") or {}
        pick = lambda key: first_id(text.get(key, config.get(key)))  # noqa: E731
        return ModelDescriptor(family=self.name, vocab_size=model.vocab_size, mask_id=None, pad_id=pick("pad_token_id"),
                               eos_id=pick("eos_token_id"), bos_id=pick("bos_token_id"), corruption="uniform",
                               process="diffusion_gemma", topology="block_causal",
                               block_size=int(config.get("canvas_length") or 256))

    def module_names(self, model):
        raise NotImplementedError("diffusion_gemma builds transformers' own model (build_network), not dlm's")

    def build_network(self, folder: Path, config: dict[str, Any], source, dtype, device):
        """(DiffusionGemmaNetwork, descriptor): transformers' model built without memory (meta device), its weights
        the memory-mapped tensors of `source` (a SafetensorsFolder); errors before anything is assigned."""
        from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

        cfg = self.model_config(config)
        descriptor = self.descriptor(config, cfg)
        descriptor.validate(config)
        hf_config = DiffusionGemmaConfig.from_pretrained(str(folder))
        if hf_config.text_config.use_bidirectional_attention == "all":
            raise CheckpointFormatError("diffusion_gemma: text_config.use_bidirectional_attention='all' (a bidirectional "
                                        "encoder) is not supported: dlm's wrapper encodes the context causally")
        hf_config._attn_implementation = "sdpa"  # the masks built here are bool: True = may attend
        with torch.device("meta"):
            model = DiffusionGemmaForBlockDiffusion(hf_config)
        del model.model.encoder.vision_tower, model.model.encoder.embed_vision  # text only
        state = load_state(model, source, dtype)
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        _fill_computed_buffers(model, hf_config)
        meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
        if meta:
            raise CheckpointFormatError(f"cannot load this diffusion_gemma checkpoint: no tensor for {meta[:5]}"
                                        f"{' and more' if len(meta) > 5 else ''} ({len(meta)} in all)")
        return DiffusionGemmaNetwork(model.to(device).eval(), cfg).eval(), descriptor


def load_state(model, source, dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by the model's names, shape-checked both ways; vision tensors are left out."""
    wanted = model.state_dict()
    problems, state = [], {}
    for name in source.entries:
        if ".vision_tower." in name or ".embed_vision." in name:
            continue
        if name not in wanted:
            problems.append(f"unexpected tensor {name}")
            continue
        got, expected = source.shape(name), tuple(wanted[name].shape)
        if got != expected:
            problems.append(f"tensor {name} has shape {got}, expected {expected}")
            continue
        tensor = source.tensor(name)
        state[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    if problems:
        raise CheckpointFormatError("cannot load this diffusion_gemma checkpoint: " + "; ".join(problems[:5]) +
                                    (f" ({len(problems)} problems in all)" if len(problems) > 5 else ""))
    return state


def _fill_computed_buffers(model, hf_config) -> None:
    """The buffers transformers computes rather than stores: rotary frequencies and the embedding scale √C."""
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import (
        DiffusionGemmaTextRotaryEmbedding, DiffusionGemmaTextScaledWordEmbedding)

    for module in model.modules():
        if isinstance(module, DiffusionGemmaTextRotaryEmbedding):
            fresh = DiffusionGemmaTextRotaryEmbedding(hf_config.text_config)
            for name, buffer in fresh.named_buffers(recurse=False):
                module._buffers[name] = buffer
        elif isinstance(module, DiffusionGemmaTextScaledWordEmbedding):
            module._buffers["embed_scale"] = torch.tensor(module.scalar_embed_scale)


register(DiffusionGemma())
