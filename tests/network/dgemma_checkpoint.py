"""A tiny random DiffusionGemma saved by transformers' own `save_pretrained` (the real layout: config.json with
model_type diffusion_gemma and its text/vision configs, model.safetensors, generation_config.json) plus a tokenizer
with Gemma's special ids (pad 0, eos 1, bos 2): the model the DiffusionGemma tests compare dlm against."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB, CANVAS, WINDOW = 64, 8, 6

TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1, sliding_window=WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], num_experts=4, top_k_experts=2,
            moe_intermediate_size=16, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
              head_dim=8)


def dgemma_model(seed: int = 0, scale: float = 0.2, embed_scale: float | None = None):
    """transformers' DiffusionGemmaForBlockDiffusion with weights far from the init (std `scale`, the embeddings
    `embed_scale` (default: scale), norms around 1), so every tensor moves the logits."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(text_config=TEXT, vision_config=VISION,
                                                                 canvas_length=CANVAS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" in name:
                continue
            if "norm" in name or name.endswith(".scale") or "per_expert_scale" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                std = embed_scale if embed_scale is not None and "embed_tokens" in name else scale
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.float().eval()


def tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            bos_token="<bos>").save_pretrained(str(folder))


def dgemma_checkpoint(folder: Path, seed: int = 0, **kw):
    """(folder, the transformers model it holds): saved by `save_pretrained`, with a tokenizer."""
    model = dgemma_model(seed, **kw)
    model.save_pretrained(str(folder))
    tokenizer(folder)
    return folder, model
